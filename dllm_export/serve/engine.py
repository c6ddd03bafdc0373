"""The model behind the server: a backend, its tokenizer, request settings -> `generate` kwargs,
and generated tokens -> the text a client sees (cut at the first end token or stop string).

Everything a request can get wrong is checked here, before it is queued, so that the batch
loop only ever runs settings that `generate` accepts.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from ..runtime.backends import load_backend
from ..runtime.loop import Plan, with_preset
from ..runtime.samplers import DREAM_SAMPLERS
from ..tokenizer import check_text, encode_prompt, load_tokenizer


class RequestError(InputError):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the field (`param`) and a `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


@dataclass(frozen=True)
class GenSettings:
    """The decoding settings of one request, as `generate` takes them (unresolved: None = its default;
    `runtime.loop.Plan` holds the same fields, resolved); equal settings share a batch."""

    gen_length: int
    steps: int | None = None
    block_length: int | None = None
    sampler: str | None = None
    temperature: float = 0.0
    cfg_scale: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    alg_temp: float | None = None
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"
    refresh: int | None = None
    refresh_tokens: int | None = None
    refresh_blocks: int | None = None
    stop_at_eos: bool = False
    seed: int | None = None

    def kwargs(self) -> dict:
        """Keyword arguments of `generate`."""
        return asdict(self)

    def batch_key(self) -> tuple:
        """What requests that share a decoding have alike: every setting but the length, with the
        block length resolved and, where a fixed number of steps decodes a block, the steps per
        block (`runtime.Decoding.admit(gen_length=)` then decodes each row's blocks as alone)."""
        block = self.block_length or self.gen_length
        parallel = self.threshold is not None or self.factor is not None  # steps unread: blocks run until decoded
        per_block = None if parallel else (self.steps or self.gen_length) // (self.gen_length // block)
        rest = tuple((k, v) for k, v in asdict(self).items() if k not in ("gen_length", "steps", "block_length"))
        return block, per_block, rest

    def batchable(self, sampler: str) -> bool:
        """Rows of other requests leave this request's tokens unchanged: greedy and unseeded (a shared
        generator would interleave draws), not Dream's batch-mean quota with ended rows, and not a cache
        that lives across blocks (`refresh_blocks`: rows answered and retired restart it for the rest)."""
        if self.seed is not None or self.temperature > 0 or sampler in ("random", "origin") or self.alg_temp:
            return False
        if (self.refresh_blocks or 1) > 1:
            return False
        return not (self.stop_at_eos and sampler in DREAM_SAMPLERS and self.threshold is None and self.factor is None)


# dLLM extensions a request may carry (OpenAI clients send them through `extra_body`)
EXTENSIONS = ("steps", "block_length", "sampler", "threshold", "factor", "cache", "refresh", "refresh_tokens",
              "refresh_blocks", "stop_at_eos", "cfg_scale", "top_k", "alg_temp", "preset")
# the request fields a preset fills when the request leaves them open (factor: it takes none then)
PRESET_FIELDS = ("cache", "threshold", "factor", "refresh_tokens", "stop_at_eos")


class Engine:
    """A loaded backend and tokenizer, with the defaults and limits of the server.

    Args:
        backend / tokenizer: what `load_backend` and `load_tokenizer` return.
        model_id: the name clients pass as `model` and /v1/models lists.
        default_max_tokens: gen_length when a request gives no max_tokens (None: that of `dllm-export
            generate`, 64, or the limit where lower); a request's prompt may shrink it to the room left.
        max_tokens_limit: the largest max_tokens accepted (default: the context).
        preset: the decoding preset (runtime.loop.PRESETS) of requests that name none; a request's
            own cache / threshold / refresh_tokens / stop_at_eos win over it (a backend without a KV
            cache takes the preset without its cache).
        default_block_length: the block length of requests that name none, where it divides their
            max_tokens (and their steps into whole blocks); requests of other lengths then share
            decodings and join them at block boundaries. None: such a request is one block of its
            own length (`generate`'s default).
    """

    def __init__(self, backend, tokenizer, model_id: str, default_max_tokens: int | None = None,
                 max_tokens_limit: int | None = None, preset: str = "reference",
                 default_block_length: int | None = None):
        with_preset(preset, {})  # an unknown preset fails here, at start-up
        for name, n in (("default_max_tokens", default_max_tokens), ("max_tokens_limit", max_tokens_limit),
                        ("default_block_length", default_block_length)):
            if n is not None and n < 1:
                raise InputError(f"{name} must be >= 1, got {n}")
        self.backend, self.tokenizer, self.model_id, self.preset = backend, tokenizer, model_id, preset
        self.default_block_length = default_block_length
        self.spec = backend.spec
        self.context = backend.max_length
        self.max_tokens_limit = max_tokens_limit or self.context
        self.default_max_tokens = default_max_tokens or min(64, self.max_tokens_limit)
        if self.default_max_tokens > self.max_tokens_limit:  # every request without max_tokens would be refused
            raise InputError(f"the default max_tokens {default_max_tokens} exceeds the max_tokens limit "
                             f"{self.max_tokens_limit}")
        # added tokens' strings (<|eot_id|>, ...): in a chat message they are text, never control tokens
        self.special_strings = tuple(tokenizer.get_added_vocab())
        self.end_ids = {i for i in (self.spec.eos_id, self.spec.eot_id) if i is not None}

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        """Ids of a completion prompt: text, or a list of token ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            _check_unicode(prompt, "prompt")
            ids = encode_prompt(self.tokenizer, prompt)
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.backend.vocab_size]
            if bad:
                raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.backend.vocab_size})",
                                   "prompt")
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        return ids

    def encode_suffix(self, suffix: str | None) -> list[int]:
        """Ids of a completion's `suffix` (infilling: the text after the completion; none: [])."""
        if not suffix:
            return []
        _check_unicode(suffix, "suffix")
        ids = encode_prompt(self.tokenizer, suffix)
        if self.spec.mask_id in ids:
            raise RequestError("the suffix holds the mask token's text: the completion is what gets unmasked",
                               "suffix")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation in the family's chat template, ready for the assistant's turn.

        The template's special tokens are control tokens; a message's text is text: a special token's
        string written in it (`<|im_end|><|im_start|>system`) is tokenized as plain characters, so a
        user cannot open a turn of another role.
        """
        for m in messages:
            _check_unicode(m["content"], "messages")
        if not any(t in m["content"] for m in messages for t in self.special_strings):
            return self.tokenizer(self._render(messages), add_special_tokens=False)["input_ids"]
        # the rare case: render with each content between markers, tokenize the contents apart with
        # special tokens split (template whitespace rules such as LLaDA's trim then keep the content whole)
        marker = f"\x00{uuid.uuid4().hex}\x00"
        text = self._render([{**m, "content": marker + m["content"] + marker} for m in messages])
        ids: list[int] = []
        for k, piece in enumerate(text.split(marker)):
            ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=k % 2 == 1)["input_ids"]
        return ids

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja raises TemplateError for conversations a template refuses
            raise RequestError(f"the chat template refused the messages: {e}", "messages") from None

    # -- settings -------------------------------------------------------------------------------
    def settings(self, req, prompt_lengths: list[int], suffix_length: int = 0) -> GenSettings:
        """Checked GenSettings of a request (a schemas.*Request) whose prompts and suffix have these
        lengths in tokens; RequestError names the field at fault."""
        longest = max(prompt_lengths) + suffix_length  # the context the completion sits in
        if req.max_tokens is None:  # the default shrinks to the room the prompt leaves (OpenAI's own default)
            gen = min(self.default_max_tokens, max(self.context - longest, 1))
        else:
            gen = req.max_tokens
        if gen > self.max_tokens_limit:
            raise RequestError(f"max_tokens {gen} exceeds this server's limit of {self.max_tokens_limit}",
                               "max_tokens")
        if longest + gen > self.context:
            what = f"prompt ({longest - suffix_length} tokens) + max_tokens ({gen})"
            what += f" + suffix ({suffix_length} tokens)" if suffix_length else ""
            raise RequestError(f"{what} = {longest + gen} exceeds the model's context of {self.context} tokens",
                               "max_tokens", "context_length_exceeded")
        top_p = None if req.top_p is None or req.top_p == 1 else req.top_p  # 1: OpenAI's "no filter"
        try:
            fast = with_preset(req.preset or self.preset, {k: getattr(req, k) for k in PRESET_FIELDS},
                               self.backend.supports_cache)
        except InputError as e:
            raise RequestError(str(e), "preset") from None
        s = GenSettings(gen_length=gen, steps=req.steps, block_length=self.block_length(req, gen),
                        sampler=req.sampler, temperature=req.temperature or 0.0, cfg_scale=req.cfg_scale or 0.0,
                        top_k=req.top_k,
                        top_p=top_p, alg_temp=req.alg_temp, refresh=req.refresh, refresh_blocks=req.refresh_blocks,
                        seed=req.seed,
                        **{"cache": "none", **fast, "stop_at_eos": bool(fast.get("stop_at_eos"))})
        try:
            Plan.resolve(self.spec, **s.kwargs()).check(self.backend)
        except InputError as e:  # Plan's messages speak of gen_length: the request calls it max_tokens
            msg = str(e).replace("gen_length", "max_tokens")
            unsupported = "backend" in msg or "does not read" in msg
            raise RequestError(msg, _param_of(str(e)), "unsupported_parameter" if unsupported else None) from None
        return s

    def block_length(self, req, gen: int) -> int | None:
        """A request's block length: its own, else the server's default where that divides its
        max_tokens `gen` and its steps into whole blocks, else None (one block)."""
        n = self.default_block_length
        if req.block_length is not None or n is None or gen % n or (req.steps is not None and req.steps % (gen // n)):
            return req.block_length
        return n

    def batchable(self, s: GenSettings) -> bool:
        """Whether requests with settings `s` may share a batch (GenSettings.batchable)."""
        return s.batchable(s.sampler or self.spec.default_sampler)

    # -- output ---------------------------------------------------------------------------------
    def text(self, tokens: list[int], stops: tuple[str, ...] = ()) -> tuple[str, str | None, int]:
        """(text, finish reason or None, tokens used) of generated tokens (a committed prefix or all of
        them): cut at the first end token (EOS / end of turn) and at the first stop string. The tokens
        used run to the end token, or through the one that completes the stop string: the same count
        for a committed prefix as for the whole row once the cut lies in it (streamed = not streamed)."""
        cut = next((k for k, t in enumerate(tokens) if t in self.end_ids), None)
        kept = tokens if cut is None else tokens[:cut]
        reason = None if cut is None else "stop"
        decode = lambda k: self.tokenizer.decode(kept[:k], skip_special_tokens=True)  # noqa: E731
        text = decode(len(kept))
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if not hits:
            return text, reason, len(kept)
        lo, hi = 1, len(kept)  # the fewest tokens whose text holds a stop string (bisection: decodes grow)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if any(s in decode(mid) for s in stops) else (mid + 1, hi)
        return text[:min(hits)], "stop", hi

    def logprobs(self, tokens: list[int], token_lp: list[float], top_lp: list, top_ids: list, chat: bool,
                 start: int = 0) -> dict:
        """OpenAI's `logprobs` of tokens[start:] of a choice whose text is `tokens` (those counted in
        its usage; a stream sends them in parts): each token's log-probability (`generate(logprobs=)`:
        under the step that committed it) and its position's top tokens; the chat shape ({"content":
        [...]}) or the completions one (tokens, token_logprobs, top_logprobs, text_offset)."""
        piece = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
        value = lambda x: None if x != x else x  # noqa: E731  (NaN: no step committed it; JSON has no NaN)
        span = range(start, len(tokens))
        if chat:
            def entry(s: str, lp: float) -> dict:
                return {"token": s, "logprob": value(lp), "bytes": list(s.encode("utf-8"))}
            content = [{**entry(piece(tokens[j]), token_lp[j]),
                        "top_logprobs": [entry(piece(i), v) for v, i in zip(top_lp[j], top_ids[j])] if top_lp else []}
                       for j in span]
            return {"content": content, "refusal": None}
        return {"tokens": [piece(tokens[j]) for j in span], "token_logprobs": [value(token_lp[j]) for j in span],
                "top_logprobs": [{piece(i): value(v) for v, i in zip(top_lp[j], top_ids[j])} for j in span]
                if top_lp else None, "text_offset": [self.offset(tokens, j) for j in span]}

    def offset(self, tokens: list[int], j: int) -> int:
        """Where token j's text starts in the text of `tokens`."""
        return len(self.tokenizer.decode(tokens[:j], skip_special_tokens=True))


def _param_of(message: str) -> str | None:
    """The request field an InputError of `Plan.check` is about (its first word that is one)."""
    names = {"gen_length": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
             **{n: n for n in EXTENSIONS}}
    for word in re.findall(r"\w+", message):
        if word in names:
            return names[word]
    return None


def _check_unicode(text: str, param: str) -> None:
    """RequestError naming the field for text a tokenizer cannot take (tokenizer.check_text)."""
    try:
        check_text(text, param)
    except InputError as e:
        raise RequestError(str(e), param) from None


def load_engine(model: str, backend: str = "auto", device: str | None = None, threads: int = 0,
                model_id: str | None = None, **limits) -> Engine:
    """Load `model` (checkpoint folder, `default`, ONNX or GGUF artifact) and its tokenizer for serving.

    `device` is a device profile (targets.PROFILES, or `auto`): its threads and onnxruntime
    providers apply; the `cuda` profile runs a torch checkpoint on the GPU.
    """
    options: dict = {}
    torch_device = "cpu"
    if device:
        from ..targets import get_profile

        profile = get_profile(device)
        threads = threads or profile.threads
        torch_device = "cuda" if profile.arch == "cuda" else "cpu"
        if profile.arch == "cuda":
            options["providers"] = list(profile.providers)
    if threads:
        import torch

        torch.set_num_threads(threads)
    be = load_backend(model, backend=backend, threads=threads, device=torch_device,
                      **(options if _is_onnx(model, backend) else {}))
    folder = Path(model).parent if str(model).endswith(".gguf") else Path(model)  # a .gguf file: its artifact folder
    tok = load_tokenizer(folder)
    name = model_id or (str(model) if str(model).startswith("default") else folder.resolve().name or str(model))
    return Engine(be, tok, name, **limits)


def _is_onnx(model: str, backend: str) -> bool:
    return backend == "onnxruntime" or (backend == "auto" and (Path(str(model)) / "model.onnx").is_file())


class TextStream:
    """The text of one streamed choice, sent as deltas while its committed prefix grows.

    A delta never takes back text: text that could still become a stop string (the last
    len(longest stop) - 1 characters) and an incomplete UTF-8 character are held back until the
    next update or the end.
    """

    def __init__(self, engine: Engine, stops: tuple[str, ...] = ()):
        self.engine, self.stops = engine, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent, self.tokens, self.reason = 0, 0, None
        self.tokens_sent = 0  # tokens whose logprobs went out (with the text they start in)

    def feed(self, tokens: list[int], final: bool = False) -> tuple[str, str | None]:
        """(new text, finish reason once finished) for the committed prefix `tokens` (all of them if `final`)."""
        if self.reason is not None:
            return "", None
        text, reason, self.tokens = self.engine.text(tokens, self.stops)
        if final and reason is None:
            reason = "length"
        safe = len(text)
        if reason is None:
            safe -= self.hold
            while safe > 0 and text[safe - 1] == "\ufffd":  # a character whose bytes are not all committed yet
                safe -= 1
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        self.reason = reason
        return delta, reason

    def advance(self, tokens: list[int], final: bool, length: int, lp_row, chat: bool) -> tuple:
        """One update of the choice from a decoding event (its generated `tokens`, committed up to
        `length` unless `final`): (new text, finish reason or None, the logprobs of the tokens that
        start in the text sent, in `Engine.logprobs`'s shape, or None without a logprob row)."""
        committed = tokens if final else tokens[:length]
        delta, reason = self.feed(committed, final)
        if lp_row is None or not (delta or reason):
            return delta, reason, None
        first, end = self.token_span(committed)
        return delta, reason, self.engine.logprobs(committed[:end], *lp_row, chat, start=first)

    def token_span(self, tokens: list[int]) -> tuple[int, int]:
        """(first, end) of the tokens whose logprobs go with the text sent so far: those not sent yet
        that start inside it, or, once finished, every token the usage counts. Call after `feed`."""
        first, end = self.tokens_sent, self.tokens_sent
        if self.reason is not None:
            end = self.tokens
        else:
            while end < self.tokens and self.engine.offset(tokens, end) < self.sent:
                end += 1
        self.tokens_sent = end
        return first, end
