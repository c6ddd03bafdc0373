"""Request bodies of the OpenAI-compatible routes (pydantic, validated by FastAPI).

Strict types (a string is not a number), unknown fields refused, OpenAI fields that a diffusion
LM cannot honour accepted only at their neutral value; the dLLM extensions (`steps`,
`block_length`, `sampler`, `threshold`, `cache`, ...) sit beside the OpenAI fields, which is
where the OpenAI clients' `extra_body` puts them.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import RequestError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI's spec lets these fields be null, meaning their default (clients send `"n": null`)
    null_is_default: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _null_to_default(cls, value, info):
        if value is None and info.field_name in cls.null_is_default:
            return cls.model_fields[info.field_name].default
        return value


class StreamOptions(_Strict):
    null_is_default = ("include_usage",)
    include_usage: bool = False


class _GenRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    null_is_default = ("n", "stream", "echo", "canvas")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None
    # OpenAI fields accepted only at their neutral value (checked in `unsupported`)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # dLLM extensions (extra_body)
    steps: int | None = Field(None, ge=1)
    block_length: int | None = Field(None, ge=1)
    sampler: str | None = None
    threshold: float | None = None
    factor: float | None = None
    cache: str | None = None
    refresh: int | None = None
    refresh_tokens: int | None = None
    refresh_blocks: int | None = None
    preset: str | None = None  # runtime.loop.PRESETS; default: the server's --preset
    stop_at_eos: bool | None = None
    cfg_scale: float | None = Field(None, ge=0)
    top_k: int | None = None
    alg_temp: float | None = None
    canvas: bool = False  # streaming: also send the denoising canvas after every step

    def wanted_logprobs(self) -> int | None:
        """Top tokens per position to return with each token's log-probability (None: no logprobs)."""
        return None

    def stops(self) -> tuple[str, ...]:
        """Stop strings (OpenAI allows up to 4)."""
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4 or any(not x for x in s):
            raise RequestError("stop takes up to 4 non-empty strings", "stop")
        return tuple(s)

    def unsupported(self) -> None:
        """Raise RequestError for OpenAI features this server does not implement."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise RequestError(f"{name} is not supported by diffusion decoding", name, "unsupported_parameter")
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", "logit_bias", "unsupported_parameter")
        if self.canvas and not self.stream:
            raise RequestError("canvas streams the denoising canvas; it needs stream: true", "canvas")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")


class CompletionRequest(_GenRequest):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # top tokens per position (OpenAI's limit: 5)
    best_of: int | None = None
    suffix: str | None = None  # infilling: the text after the completion (the canvas lies between)

    def prompts(self) -> list:
        """The prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RequestError("the prompt is empty", "prompt")
        return list(p)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs is not None and self.echo:
            raise RequestError("logprobs with echo would score the prompt: diffusion decoding has no left-to-right "
                               "likelihood (score text with dllm-export eval or the lm-eval adapter)", "echo",
                               "unsupported_parameter")
        if self.suffix and self.echo:
            raise RequestError("echo and suffix cannot be combined: the answer is the text between the prompt and "
                               "the suffix", "echo")
        if self.best_of not in (None, self.n):
            raise RequestError("best_of other than n is not supported", "best_of", "unsupported_parameter")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None]  # null: an assistant turn without text (OpenAI allows it)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _null_only_for_assistant(cls, content, info):
        if content is None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message may have null content")
        return content

    def as_dict(self) -> dict:
        """{"role", "content"} with text parts joined, as chat templates take it."""
        parts = self.content or ""
        text = parts if isinstance(parts, str) else "".join(p.text for p in parts)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(_Strict):
    type: str


class ChatRequest(_GenRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise RequestError(f"response_format {self.response_format.type!r} is not supported (only 'text')",
                               "response_format", "unsupported_parameter")
        if self.max_completion_tokens is not None:
            if self.max_tokens not in (None, self.max_completion_tokens):
                raise RequestError("max_tokens and max_completion_tokens differ", "max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
