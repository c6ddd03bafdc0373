"""`dllm-export serve`: the real server on a free loopback port, driven by the official openai client
(completions, chat, streaming) and by raw HTTP (httpx) for bad input; results against `generate`
on the torch (bundled model), onnxruntime and llama.cpp (tiny artifacts) backends."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dllm_export import generate  # noqa: E402
from dllm_export.serve import ServeConfig, bind_socket, load_engine, make_server  # noqa: E402
from dllm_export.serve.batcher import Batcher, Job  # noqa: E402
from dllm_export.errors import InputError  # noqa: E402
from dllm_export.serve.engine import GenSettings, RequestError  # noqa: E402
from dllm_export.tokenizer import encode_prompt  # noqa: E402

PROMPTS = ["12+34=", "def fibonacci(n):", "7*8=", "class Stack:\n    def push(self, item):", "90-45=",
           "import os\n", "x = [1, 2, 3]\nfor i in x:", "The quick brown fox"]


@contextmanager
def running(engine, cfg: ServeConfig = ServeConfig()):
    """The server on a free loopback port in a thread; yields its base URL; stops it gracefully."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(engine, replace(cfg, port=sock.getsockname()[1]), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 30, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def expected(engine, ids, **kw) -> str:
    """What the server must answer: `generate` alone on this prompt, cut at the first end token."""
    row = generate(engine.backend, ids, **kw).generated[0].tolist()
    cut = next((k for k, t in enumerate(row) if t in engine.end_ids), len(row))
    return engine.tokenizer.decode(row[:cut], skip_special_tokens=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny models gain nothing from more, and a shared CI host loses a lot."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_engine():
    return load_engine("default")


@pytest.fixture(scope="module")
def torch_url(torch_engine):
    with running(torch_engine, ServeConfig(max_batch=8, batch_wait=0.02)) as url:
        yield url


@pytest.fixture(scope="module")
def artifact_engines(tiny_dirs, tmp_path_factory):
    """onnxruntime and llama.cpp engines on tiny float artifacts of one random LLaDA checkpoint."""
    root = tmp_path_factory.mktemp("serve_artifacts")
    engines = {}
    pytest.importorskip("onnxruntime")
    from dllm_export.exporter.onnx import export_onnx

    engines["onnxruntime"] = load_engine(str(export_onnx(tiny_dirs["llada"], root / "onnx")))
    try:
        pytest.importorskip("llama_cpp")
        from dllm_export.exporter.gguf import GgufExportConfig, export_gguf

        cfg = GgufExportConfig(quant="F32", embed_type="F32", head_type="F32")
        engines["llama.cpp"] = load_engine(str(export_gguf(tiny_dirs["llada"], root / "gguf", cfg)))
    except pytest.skip.Exception:
        pass
    return engines


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


DLLM = {"steps": 16, "block_length": 8}  # two blocks: the stream commits left to right


def test_completion_torch_equals_generate(torch_engine, torch_url):
    ids = encode_prompt(torch_engine.tokenizer, PROMPTS[1])
    r = client(torch_url).completions.create(model="default", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                             extra_body=DLLM)
    assert r.choices[0].text == expected(torch_engine, ids, gen_length=16, **DLLM)
    assert r.usage.prompt_tokens == len(ids) and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_with_the_edge_preset_equals_generate(torch_engine, torch_url):
    """A request naming the edge preset decodes as `generate` with PRESETS["edge"], through the official client."""
    from dllm_export.runtime.loop import PRESETS

    ids = encode_prompt(torch_engine.tokenizer, PROMPTS[0])
    kw = {"steps": 64, "block_length": 32}
    r = client(torch_url).completions.create(model="default", prompt=PROMPTS[0], max_tokens=64, temperature=0,
                                             extra_body={**kw, "preset": "edge"})
    assert r.choices[0].text == expected(torch_engine, ids, gen_length=64, **kw, **PRESETS["edge"])
    assert r.model_extra["dllm"]["nfe"] < 64  # threshold decoding and the EOS stop: fewer forwards than tokens


def test_completion_with_a_cache_across_blocks_equals_generate(torch_engine, torch_url):
    """`refresh_blocks` through the official client: the request decodes alone, as `generate` does."""
    ids = encode_prompt(torch_engine.tokenizer, PROMPTS[1])
    kw = {"steps": 32, "block_length": 8, "cache": "dual", "refresh_blocks": 4}
    r = client(torch_url).completions.create(model="default", prompt=PROMPTS[1], max_tokens=32, temperature=0,
                                             extra_body=kw)
    assert r.choices[0].text == expected(torch_engine, ids, gen_length=32, **kw)


def test_completion_with_a_suffix_infills_as_generate(torch_engine, torch_url):
    """OpenAI's `suffix`: the completion is the text between the prompt and the suffix, as `generate`
    with `suffix_ids` decodes it alone, streamed or not, with n rows, and in a batch beside requests
    with another suffix or none (right-padded rows); usage counts the suffix as prompt."""
    tok, c = torch_engine.tokenizer, client(torch_url)
    cases = [("def add(a, b):\n    ", "\n\nprint(add(1, 2))"), ("12+34=", " is the sum"), ("x = [1, 2, 3]\n", None)]
    want = {}
    for prompt, suffix in cases:
        sfx = None if suffix is None else [encode_prompt(tok, suffix)]
        want[prompt] = expected(torch_engine, encode_prompt(tok, prompt), gen_length=16, suffix_ids=sfx, **DLLM)
    prompt, suffix = cases[0]
    r = c.completions.create(model="default", prompt=prompt, suffix=suffix, max_tokens=16, n=2, extra_body=DLLM)
    assert [ch.text for ch in r.choices] == [want[prompt]] * 2
    assert r.usage.prompt_tokens == len(encode_prompt(tok, prompt)) + len(encode_prompt(tok, suffix))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="default", prompt=prompt, suffix=suffix, max_tokens=16, stream=True, extra_body=DLLM))
    assert streamed == want[prompt]

    def ask(case):
        kw = {} if case[1] is None else {"suffix": case[1]}
        r = c.completions.create(model="default", prompt=case[0], max_tokens=16, extra_body=DLLM, **kw)
        return case[0], r.choices[0].text, r.model_extra["dllm"]["batch_rows"]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, cases * 4))
    assert all(text == want[p] for p, text, _ in answers)
    assert max(rows for _, _, rows in answers) > 1  # rows with other suffixes shared a batch


def test_logprobs_are_generates_through_the_official_client(torch_engine, torch_url):
    """`logprobs` (completions: top k <= 5) and `logprobs` + `top_logprobs` (chat): each returned
    token with its log-probability under the step that committed it, as `generate(logprobs=k)`
    gives it, its position's top tokens, and offsets into the text; alone or beside other requests."""
    tok, c = torch_engine.tokenizer, client(torch_url)
    ids = encode_prompt(tok, PROMPTS[1])
    out = generate(torch_engine.backend, ids, gen_length=16, logprobs=3, **DLLM)
    row = out.generated[0].tolist()
    r = c.completions.create(model="default", prompt=PROMPTS[1], max_tokens=16, logprobs=3, extra_body=DLLM)
    lp, k = r.choices[0].logprobs, r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == k
    assert lp.token_logprobs == pytest.approx(out.logprobs[0, :k].tolist(), abs=1e-5)
    assert lp.text_offset == [len(tok.decode(row[:j], skip_special_tokens=True)) for j in range(k)]
    for j, top in enumerate(lp.top_logprobs):
        want = {tok.decode([int(i)]): v for v, i in zip(out.top_logprobs[0][0, j].tolist(), out.top_logprobs[1][0, j])}
        assert top == pytest.approx(want, abs=1e-5)
    msgs = [{"role": "user", "content": "What is 12+7?"}]
    chat_ids = encode_prompt(tok, msgs[0]["content"], chat=True)
    chat_out = generate(torch_engine.backend, chat_ids, gen_length=16, logprobs=2, **DLLM)
    with ThreadPoolExecutor(3) as pool:  # beside requests without logprobs, in one batch or not
        plain = [pool.submit(c.completions.create, model="default", prompt=p, max_tokens=16, extra_body=DLLM)
                 for p in PROMPTS[2:4]]
        r = c.chat.completions.create(model="default", messages=msgs, max_tokens=16, logprobs=True, top_logprobs=2,
                                      extra_body=DLLM)
        assert all(f.result().choices[0].text for f in plain)
    content, k = r.choices[0].logprobs.content, r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == k
    assert [t.logprob for t in content] == pytest.approx(chat_out.logprobs[0, :k].tolist(), abs=1e-5)  # batched: float noise
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)


def test_streamed_logprobs_are_the_answers_in_parts(torch_url):
    """Streamed with logprobs, each delta carries the tokens that start in its text: joined, the
    chunks' tokens, log-probabilities, top tokens and offsets are the non-streamed answer's (four
    blocks, so the text arrives in parts; the stop string holds text back)."""
    c = client(torch_url)
    body = {"steps": 32, "block_length": 8}
    for kw in ({}, {"stop": ["):"]}):
        full = c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=32, logprobs=2, extra_body=body,
                                    **kw)
        chunks = [ch.choices[0] for ch in c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=32,
                                                               logprobs=2, stream=True, extra_body=body, **kw)]
        parts = [ch.logprobs for ch in chunks if ch.logprobs is not None]
        assert "".join(ch.text for ch in chunks) == full.choices[0].text and len(parts) >= 2
        want = full.choices[0].logprobs
        assert sum((p.tokens for p in parts), []) == want.tokens
        assert sum((p.token_logprobs for p in parts), []) == want.token_logprobs
        assert sum((p.top_logprobs for p in parts), []) == want.top_logprobs
        assert sum((p.text_offset for p in parts), []) == want.text_offset
    msgs = [{"role": "user", "content": "What is 12+7?"}]
    full = c.chat.completions.create(model="default", messages=msgs, max_tokens=16, logprobs=True, top_logprobs=1,
                                     extra_body=DLLM)
    chunks = [ch.choices[0] for ch in c.chat.completions.create(model="default", messages=msgs, max_tokens=16,
                                                                logprobs=True, top_logprobs=1, stream=True,
                                                                extra_body=DLLM) if ch.choices]
    content = sum((ch.logprobs.content for ch in chunks if ch.logprobs is not None), [])
    assert [t.model_dump() for t in content] == [t.model_dump() for t in full.choices[0].logprobs.content]


def test_chat_and_stream_torch(torch_engine, torch_url):
    c = client(torch_url)
    msgs = [{"role": "user", "content": "What is 12+7?"}]
    ids = encode_prompt(torch_engine.tokenizer, msgs[0]["content"], chat=True)
    want = expected(torch_engine, ids, gen_length=16, **DLLM)
    r = c.chat.completions.create(model="default", messages=msgs, max_tokens=16, extra_body=DLLM)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="default", messages=msgs, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, extra_body=DLLM))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_stream_emits_blocks_in_order(torch_engine, torch_url):
    """With 4 blocks of 16 the committed prefix grows several times: several deltas before the end."""
    body = {"steps": 64, "block_length": 16}
    c = client(torch_url)
    full = c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=64, extra_body=body)
    deltas = [ch.choices[0].text for ch in c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=64,
                                                                stream=True, extra_body=body)]
    assert "".join(deltas) == full.choices[0].text
    if full.choices[0].finish_reason == "length":
        assert sum(1 for d in deltas if d) >= 2


@pytest.mark.parametrize("backend", ["onnxruntime", "llama.cpp"])
def test_artifact_backends(backend, artifact_engines):
    if backend not in artifact_engines:
        pytest.skip(f"{backend} not installed")
    engine = artifact_engines[backend]
    ids = [5, 17, 42, 99, 7]  # token ids: the random checkpoint's tokenizer makes no sense of text
    with running(engine) as url:
        c = client(url)
        r = c.completions.create(model=engine.model_id, prompt=ids, max_tokens=16, extra_body=DLLM)
        assert r.choices[0].text == expected(engine, ids, gen_length=16, **DLLM)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=engine.model_id, prompt=ids, max_tokens=16, stream=True, extra_body=DLLM))
        assert streamed == r.choices[0].text
        chat = c.chat.completions.create(model=engine.model_id, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=8)
        assert chat.usage.completion_tokens <= 8
        sfx = c.completions.create(model=engine.model_id, prompt=ids, suffix="ab c", max_tokens=16, extra_body=DLLM)
        suffix_ids = [encode_prompt(engine.tokenizer, "ab c")]
        assert sfx.choices[0].text == expected(engine, ids, gen_length=16, suffix_ids=suffix_ids, **DLLM)
        if backend == "llama.cpp":  # no KV cache in llama.cpp: refused by name, not run
            res = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 8, "cache": "dual"})
            assert res.status_code == 400 and "cache" in res.json()["error"]["message"]


BAD = [  # (raw body, expected status, a word of the message)
    ("{not json", 400, "JSON"),
    ("[1, 2]", 400, "dictionary"),
    ('{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ('{"prompt": "x", "max_tokens": "8"}', 400, "max_tokens"),
    ('{"prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
    ('{"max_tokens": 8}', 400, "prompt"),
    ('{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 5000}', 400, "max_tokens"),
    ('{"prompt": [' + ",".join(["5"] * 1020) + '], "max_tokens": 8}', 400, "context"),
    ('{"prompt": [999999], "max_tokens": 8}', 400, "vocabulary"),
    ('{"prompt": "", "max_tokens": 8}', 400, "empty"),
    ('{"prompt": "x", "max_tokens": 16, "block_length": 5}', 400, "multiple"),
    ('{"prompt": "x", "max_tokens": 8, "sampler": "nope"}', 400, "sampler"),
    ('{"prompt": "x", "max_tokens": 8, "cache": "huge"}', 400, "cache"),
    ('{"prompt": "x", "max_tokens": 8, "top_p": 0.5}', 400, "top_p"),
    ('{"prompt": "x", "max_tokens": 8, "logprobs": 2, "echo": true}', 400, "would score the prompt"),
    ('{"prompt": "x", "max_tokens": 8, "logprobs": 6}', 400, "logprobs"),
    ('{"prompt": "x", "max_tokens": 8, "presence_penalty": 1.0}', 400, "presence_penalty"),
    ('{"prompt": "x", "max_tokens": 8, "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ('{"prompt": "x", "max_tokens": 8, "n": 9}', 400, "n"),
    ('{"prompt": "x", "model": "gpt-4"}', 404, "gpt-4"),
    ('{"prompt": "x", "max_tokens": 8, "seed": 18446744073709551616}', 400, "seed"),
    ('{"prompt": "\\ud800 x", "max_tokens": 8}', 400, "not valid UTF-8"),
    ('{"prompt": "x", "max_tokens": 8, "stream_options": {"include_usage": true}}', 400, "stream_options"),
    ('{"prompt": "x", "max_tokens": 8, "suffix": "y", "echo": true}', 400, "echo and suffix"),
    ('{"prompt": "x", "max_tokens": 8, "suffix": "<|mdm_mask|>"}', 400, "mask token"),
    ('{"prompt": "x", "max_tokens": 8, "suffix": "' + "y " * 1030 + '"}', 400, "+ suffix ("),
    ('{"prompt": "x", "max_tokens": 8, "suffix": 5}', 400, "suffix"),
]


@pytest.mark.parametrize("body,status,word", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_completion_requests(body, status, word, torch_url):
    r = httpx.post(f"{torch_url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and word in err["message"], err


@pytest.mark.parametrize("body,word", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": None}]}, "only an assistant message may have null content"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "not valid UTF-8"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_chat_requests(body, word, torch_url):
    r = httpx.post(f"{torch_url}/v1/chat/completions", content=json.dumps(body),  # \ud800 stays an escape
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


def test_server_survives_other_bad_input(torch_url):
    assert httpx.post(f"{torch_url}/v1/completions", content=b"x" * (2 << 20)).status_code == 413
    chunked = httpx.post(f"{torch_url}/v1/completions", content=iter([b'{"prompt": "', b"y" * (2 << 20), b'"}']))
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{torch_url}/v1/nothing").status_code == 404
    assert httpx.get(f"{torch_url}/v1/completions").status_code == 405
    assert httpx.post(f"{torch_url}/v1/completions", content=b"\xff\xfe", headers={"content-type":
                                                                                      "application/json"}).status_code == 400
    health = httpx.get(f"{torch_url}/health").json()
    assert health["status"] == "ok"
    models = client(torch_url).models.list()
    assert [m.id for m in models.data] == ["default"]


def test_load_32_requests_8_clients(torch_engine, torch_url):
    """32 requests from 8 concurrent clients: all answered, each equal to decoding it alone; batched."""
    c = client(torch_url)
    kw = {"gen_length": 16, "steps": 16, "block_length": 8}
    want = {p: expected(torch_engine, encode_prompt(torch_engine.tokenizer, p), **kw) for p in PROMPTS}

    def ask(i: int) -> tuple[str, str, int]:
        p = PROMPTS[i % len(PROMPTS)]
        r = c.completions.create(model="default", prompt=p, max_tokens=16, extra_body=DLLM)
        return p, r.choices[0].text, r.model_extra["dllm"]["batch_rows"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32 and all(text == want[p] for p, text, _ in answers)
    assert max(rows for _, _, rows in answers) > 1  # some requests were decoded together
    metrics = httpx.get(f"{torch_url}/metrics").text
    assert "dllm_batch_rows_bucket" in metrics and "dllm_step_seconds_count" in metrics


def test_n_and_stop(torch_engine, torch_url):
    c = client(torch_url)
    r = c.completions.create(model="default", prompt="12+34=", max_tokens=8, n=3, extra_body={"steps": 8})
    assert len(r.choices) == 3 and len({ch.text for ch in r.choices}) == 1  # greedy: three equal rows
    full = r.choices[0].text
    if len(full) >= 2:
        cut = c.completions.create(model="default", prompt="12+34=", max_tokens=8, stop=[full[1:]],
                                   extra_body={"steps": 8})
        assert cut.choices[0].text == full[:1] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="default", prompt="12+34=", max_tokens=8, stop=[full[1:]], stream=True, extra_body={"steps": 8}))
        assert streamed == full[:1]


def test_a_request_is_answered_once_its_committed_text_has_ended(torch_engine, torch_url):
    """The reference loop decodes all 8 blocks, but "12+34=" ends (46, then EOS) in the first: the
    answer goes out after its 8 steps, the text generate's; a stop string in the committed prefix
    ends a request the same way, the text cut as on the whole row."""
    c = client(torch_url)
    kw = {"steps": 64, "block_length": 8}
    ids = encode_prompt(torch_engine.tokenizer, "12+34=")
    r = c.completions.create(model="default", prompt="12+34=", max_tokens=64, extra_body=kw)
    assert r.choices[0].text == expected(torch_engine, ids, gen_length=64, **kw) == "46"
    assert r.choices[0].finish_reason == "stop" and r.model_extra["dllm"]["nfe"] == 8
    assert r.usage.completion_tokens == 2
    metrics = httpx.get(f"{torch_url}/metrics").text.splitlines()
    assert float(next(x for x in metrics if x.startswith("dllm_early_answers_total ")).split()[1]) >= 1
    with_lp = c.completions.create(model="default", prompt="12+34=", max_tokens=64, logprobs=1, extra_body=kw)
    assert with_lp.model_extra["dllm"]["nfe"] == 8 and with_lp.choices[0].logprobs.tokens == ["4", "6"]
    want = generate(torch_engine.backend, ids, gen_length=64, logprobs=0, **kw).logprobs[0, :2].tolist()
    assert with_lp.choices[0].logprobs.token_logprobs == pytest.approx(want, abs=1e-5)
    full = c.completions.create(model="default", prompt=PROMPTS[1], max_tokens=64, extra_body=kw)
    assert full.model_extra["dllm"]["nfe"] == 64 and len(full.choices[0].text) > 12
    stop = full.choices[0].text[8:12]
    cut = c.completions.create(model="default", prompt=PROMPTS[1], max_tokens=64, stop=[stop], extra_body=kw)
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.model_extra["dllm"]["nfe"] < 64


def test_bad_requests_name_their_field(torch_url):
    """The field at fault is the error's `param`: a seed torch cannot take, a cache the backend lacks."""
    r = httpx.post(f"{torch_url}/v1/completions", json={"prompt": "x", "max_tokens": 8, "seed": -(1 << 63) - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = httpx.post(f"{torch_url}/v1/completions", json={"prompt": "x", "max_tokens": 8, "refresh": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "refresh"
    # a sampler that threshold decoding would not read: the sampler is at fault, an unsupported pairing
    r = httpx.post(f"{torch_url}/v1/completions", json={"prompt": "x", "max_tokens": 8, "threshold": 0.9,
                                                         "sampler": "entropy"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampler", r.json()
    assert r.json()["error"]["code"] == "unsupported_parameter"


def test_openai_client_details(torch_engine, torch_url):
    """What the official client and its kin send and read: explicit nulls, models.retrieve, echo in a
    stream, and the same usage streamed or not when a stop string cuts the text."""
    r = httpx.post(f"{torch_url}/v1/completions", json={"prompt": "1+1=", "max_tokens": 4, "n": None, "stream": None,
                                                         "echo": None, "steps": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    c = client(torch_url)
    assert c.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    kw = dict(model="default", prompt="12+34=", max_tokens=8, extra_body={"steps": 8})
    whole = c.completions.create(echo=True, **kw).choices[0].text
    assert whole.startswith("12+34=")
    assert "".join(ch.choices[0].text for ch in c.completions.create(echo=True, stream=True, **kw)) == whole
    full = c.completions.create(**kw).choices[0].text
    if len(full) >= 2:
        stop = [full[1:]]
        cut = c.completions.create(stop=stop, **kw)
        chunks = list(c.completions.create(stop=stop, stream=True, stream_options={"include_usage": True}, **kw))
        assert cut.usage.completion_tokens == chunks[-1].usage.completion_tokens < 8
    chat = c.chat.completions.create(model="default", max_tokens=4, extra_body={"steps": 4}, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "1+1="}])
    assert chat.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", ["default", "default-dream"])
def test_chat_text_never_becomes_control_tokens(model):
    """A special token's string in a message is text: the ids hold the template's control tokens
    only; a conversation without such strings tokenizes exactly as before (the whole rendered text)."""
    engine = load_engine(model)
    tok = engine.tokenizer
    plain = [{"role": "user", "content": "say hi"}]
    text = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert engine.encode_chat(plain) == tok(text, add_special_tokens=False)["input_ids"]
    specials = set(tok.get_added_vocab().values())
    injected = [{"role": "user", "content": f"say hi{''.join(tok.get_added_vocab())} then stop"}]
    count = lambda ids: sum(i in specials for i in ids)  # noqa: E731
    assert count(engine.encode_chat(injected)) == count(engine.encode_chat(plain))
    assert tok.decode(engine.encode_chat(injected)).count("then stop") == 1


def test_default_max_tokens_fits_the_limit_and_the_room(torch_engine):
    from dllm_export.serve.engine import Engine
    from dllm_export.serve.schemas import CompletionRequest

    be, tok = torch_engine.backend, torch_engine.tokenizer
    assert Engine(be, tok, "m", max_tokens_limit=32).default_max_tokens == 32
    with pytest.raises(InputError, match="the default max_tokens 64 exceeds the max_tokens limit 32"):
        Engine(be, tok, "m", default_max_tokens=64, max_tokens_limit=32)
    req = CompletionRequest(prompt="x")
    assert torch_engine.settings(req, [torch_engine.context - 16]).gen_length == 16  # the room the prompt leaves
    assert torch_engine.settings(req, [8]).gen_length == 64


def test_api_key(torch_engine):
    with running(torch_engine, ServeConfig(api_key="s3cret")) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "1+1=", "max_tokens": 4})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/v1/completions", content=b"{not json")  # refused before its body is read
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(model="default", prompt="1+1=", max_tokens=4)
        ok = client(url, "s3cret").completions.create(model="default", prompt="1+1=", max_tokens=4)
        assert ok.usage.completion_tokens <= 4
        assert httpx.get(f"{url}/health").status_code == 200


def test_disconnect_stops_the_batch(torch_engine):
    """A client that leaves mid-stream frees its slot: the batch stops between two steps."""
    with running(torch_engine, ServeConfig(max_batch=1)) as url:
        body = {"prompt": "def f(x):", "max_tokens": 512, "block_length": 8, "steps": 512, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        time.sleep(1.0)

        def steps() -> float:
            line = [x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith("dllm_step_seconds_count")]
            return float(line[0].split()[-1])
        before = steps()
        time.sleep(1.0)
        assert steps() == before and before < 512
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "1+1=", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200


def test_queue_bounds_and_timeout(torch_engine):
    import asyncio

    b = Batcher(torch_engine, max_batch=2, max_queue=1)  # not started: jobs stay queued
    loop = asyncio.new_event_loop()
    job = lambda rows: Job(rows=rows, settings=GenSettings(gen_length=4), loop=loop, events=asyncio.Queue(),  # noqa: E731
                           deadline=time.monotonic() + 10)
    b.submit(job([[1, 2]]))
    with pytest.raises(RequestError) as e:
        b.submit(job([[1, 2]]))
    assert e.value.status == 429
    with pytest.raises(RequestError) as e:
        b.submit(job([[1], [2], [3]]))
    assert e.value.status == 400 and e.value.param == "prompt"  # three prompts, n 1: the prompts are at fault
    with pytest.raises(RequestError) as e:
        b.submit(Job(rows=[[1]] * 3, settings=GenSettings(gen_length=4), loop=loop, events=asyncio.Queue(),
                     deadline=time.monotonic() + 10, n=3))
    assert e.value.status == 400 and e.value.param == "n"
    loop.close()
    with running(torch_engine, ServeConfig(timeout=0.2)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 256, "steps": 256}, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        assert r.headers["x-should-retry"] == "false"  # the official clients would resend it twice


def test_queued_client_that_leaves_frees_its_slot(torch_engine):
    """A request waiting in the queue whose client gives up is dropped: with a queue of one, the
    next request is queued (not refused with 429) while the first still runs."""
    long = {"prompt": "x", "max_tokens": 256, "steps": 256}  # ~11 s on 2 cores: well past the 2.5 s this needs
    with running(torch_engine, ServeConfig(max_batch=1, max_queue=1)) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=120)
            time.sleep(0.5)  # the worker runs it
            with pytest.raises(httpx.ReadTimeout):  # queued behind it; the client leaves
                httpx.post(f"{url}/v1/completions", json=long, timeout=1.0)
            time.sleep(1.0)  # the server notices within 0.5 s
            assert not first.done(), "the first request ended too soon for this test"
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "y", "max_tokens": 8, "steps": 8}, timeout=120)
            assert r.status_code == 200, r.text
            assert first.result().status_code == 200


@pytest.mark.parametrize("last, during, after, arrive, expect_jobs, max_s", [
    (1, 0, 1, 0, 1, 0.5),   # a lone client (its next request came after its answer) never waits
    (7, 1, 0, 7, 8, 2.0),   # 7 answered + 1 queued meanwhile: the batch starts once the 7 are back
    (7, 1, 0, 3, 4, 10.0),  # fewer come back: it starts after batch_wait with those that came
])
def test_batch_waits_for_the_clients_it_expects(torch_engine, last, during, after, arrive, expect_jobs, max_s):
    import asyncio

    wait = 3.0
    b = Batcher(torch_engine, max_batch=16, batch_wait=wait)  # not started: _take is called here
    loop = asyncio.new_event_loop()
    job = lambda: Job(rows=[[1, 2]], settings=GenSettings(gen_length=4), loop=loop,  # noqa: E731
                      events=asyncio.Queue(), deadline=time.monotonic() + 60)
    b._last_jobs = last  # the last batch: `last` requests, answered after `during` others were queued
    for _ in range(during):
        b.submit(job())
    time.sleep(0.01)
    b._answered = time.monotonic()
    time.sleep(0.01)
    for _ in range(after):
        b.submit(job())
    got = {}

    def take():
        t0 = time.monotonic()
        got["batch"], got["s"] = b._take(), time.monotonic() - t0

    worker = threading.Thread(target=take)
    worker.start()
    for _ in range(arrive):
        time.sleep(0.01)
        b.submit(job())
    worker.join(30)
    loop.close()
    assert len(got["batch"]) == expect_jobs
    assert got["s"] < max_s
    if expect_jobs < last + during:
        assert got["s"] >= wait * 0.95  # the missing clients were waited for, batch_wait at most


def test_request_settings_are_the_loop_plan_fields():
    """GenSettings (a request's settings) and runtime.loop.Plan (resolved) keep one field list."""
    from dataclasses import fields

    from dllm_export.runtime.loop import Plan

    assert {f.name for f in fields(GenSettings)} == {f.name for f in fields(Plan)} - {"eps"}


@pytest.mark.parametrize("settings,batchable", [
    (dict(cache="dual"), True),
    (dict(cache="dual", refresh=2), True),
    (dict(cache="dual", refresh_tokens=4), True),  # each row's cache is refreshed on its own commits
    (dict(cache="dual", refresh_blocks=1), True),
    (dict(cache="dual", refresh_blocks=4), False),  # retired rows would restart the others' cache
    (dict(seed=1), False),
])
def test_which_requests_share_a_batch(settings, batchable):
    assert GenSettings(gen_length=8, **settings).batchable("low_confidence") is batchable


@pytest.mark.parametrize("server,request_fields,want", [
    ("reference", {}, dict(cache="none", threshold=None, refresh_tokens=None, stop_at_eos=False)),
    ("edge", {}, dict(cache="dual", threshold=0.99, refresh_tokens=16, stop_at_eos=True)),
    # the preset's cache refresh goes with its cache
    ("edge", {"cache": "none", "threshold": 0.5}, dict(cache="none", threshold=0.5, refresh_tokens=None,
                                                      stop_at_eos=True)),
    ("edge", {"preset": "reference"}, dict(cache="none", threshold=None, refresh_tokens=None, stop_at_eos=False)),
    ("edge", {"factor": 1.0}, dict(cache="none", threshold=None, factor=1.0, stop_at_eos=False)),
    ("reference", {"preset": "edge", "stop_at_eos": False}, dict(cache="dual", threshold=0.99, stop_at_eos=False)),
])
def test_presets_fill_what_a_request_leaves_open(torch_engine, server, request_fields, want):
    """The server's --preset (or the request's own `preset`) fills the decoding settings a request does
    not set, by the CLI's rule (runtime.loop.with_preset)."""
    from dllm_export.serve.engine import Engine
    from dllm_export.serve.schemas import CompletionRequest

    engine = Engine(torch_engine.backend, torch_engine.tokenizer, "m", preset=server)
    s = engine.settings(CompletionRequest(model="m", prompt="1+1=", max_tokens=8, **request_fields), [4])
    assert {k: getattr(s, k) for k in want} == want


def test_unknown_presets_are_refused_and_cacheless_backends_take_the_rest(torch_engine, artifact_engines):
    from dllm_export.serve.engine import Engine
    from dllm_export.serve.schemas import CompletionRequest

    with pytest.raises(RequestError, match="unknown preset 'fast'") as e:
        torch_engine.settings(CompletionRequest(model="m", prompt="1+1=", max_tokens=8, preset="fast"), [4])
    assert e.value.param == "preset"
    with pytest.raises(InputError, match="unknown preset"):
        Engine(torch_engine.backend, torch_engine.tokenizer, "m", preset="fast")
    if "llama.cpp" in artifact_engines:  # no KV cache: the edge preset without its cache
        be = artifact_engines["llama.cpp"]
        s = Engine(be.backend, be.tokenizer, "m", preset="edge").settings(
            CompletionRequest(model="m", prompt=[5, 9], max_tokens=8), [2])
        assert (s.cache, s.refresh_tokens, s.threshold, s.stop_at_eos) == ("none", None, 0.99, True)


def test_on_canvas_hook_leaves_the_trace(torch_engine):
    ids = encode_prompt(torch_engine.tokenizer, PROMPTS[0])
    seen = []
    a = generate(torch_engine.backend, ids, gen_length=16, block_length=8, on_canvas=lambda x: seen.append(x.clone()))
    b = generate(torch_engine.backend, ids, gen_length=16, block_length=8)
    assert a.ids.equal(b.ids) and len(seen) == a.nfe and seen[-1].equal(a.ids)


@pytest.mark.parametrize("settings, message", [
    (dict(port=70000), "port must lie in 0..65535"), (dict(max_queue=0), "max_queue must be >= 1, got 0"),
    (dict(max_body_bytes=0), "max_body_bytes must be >= 1"),
    (dict(graceful_timeout=-1), "graceful_timeout must be >= 0"),
])
def test_server_settings_that_cannot_serve_are_refused(settings, message):
    """A queue or body limit of 0 would refuse every request and a port out of range would raise
    OverflowError at bind: refused at start-up instead, by name."""
    from dllm_export.errors import InputError

    with pytest.raises(InputError, match=message):
        ServeConfig(**settings)


def test_engine_limits_below_one_are_refused(torch_engine):
    from dllm_export.errors import InputError
    from dllm_export.serve.engine import Engine

    for limits in (dict(default_max_tokens=0), dict(max_tokens_limit=-3)):
        with pytest.raises(InputError, match=f"{next(iter(limits))} must be >= 1"):
            Engine(torch_engine.backend, torch_engine.tokenizer, "m", **limits)


def test_cli_serve_bad_input(tmp_path, capsys):
    from dllm_export.cli import main

    sock = bind_socket("127.0.0.1", 0)
    sock.listen()
    assert main(["serve", "default", "--port", str(sock.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err
    sock.close()
    assert main(["serve", str(tmp_path / "none"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_cli_serve_starts_and_shuts_down():
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "dllm_export.cli", "serve", "default", "--port", str(port),
                             "--log-level", "warning", "--threads", "1"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as tests/test_crash.py
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None and time.monotonic() - t0 < 120
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = client(f"http://127.0.0.1:{port}").completions.create(model="default", prompt="1+1=", max_tokens=4)
        assert json.loads(r.model_dump_json())["usage"]["prompt_tokens"] > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_canvas_events(torch_url):
    """`canvas: true` adds the denoising canvas after every step: masks (null) give way to tokens."""
    body = {"prompt": "def f(x):", "max_tokens": 16, "steps": 16, "block_length": 8, "stream": True, "canvas": True}
    events = []
    with httpx.stream("POST", f"{torch_url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    canvases = [e["canvas"][0]["tokens"] for e in events if e["object"] == "dllm.canvas"]
    assert len(canvases) >= 15 and all(len(c) == 16 for c in canvases)
    masked = [sum(t is None for t in c) for c in canvases]
    assert masked == sorted(masked, reverse=True) and masked[0] == 15
    assert httpx.post(f"{torch_url}/v1/completions", json={**body, "stream": False}).status_code == 400


def test_graceful_shutdown_finishes_in_flight(torch_engine):
    """Shutdown stops accepting and lets a request in flight finish with its answer."""
    answers = []
    with running(torch_engine) as url:
        def ask():
            answers.append(httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 32},
                                      timeout=60))
        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.5)  # the request is being decoded when the server is told to stop
    t.join(60)
    assert answers and answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] >= 0


def test_dream_chat_and_completion():
    """The Dream family (shifted logits, its own chat template) through the server, batched."""
    engine = load_engine("default-dream")
    with running(engine, ServeConfig(batch_wait=0.05)) as url:
        c = client(url)
        ids = [encode_prompt(engine.tokenizer, p) for p in PROMPTS[:4]]
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: c.completions.create(model="default-dream", prompt=p, max_tokens=16,
                                                                 extra_body=DLLM).choices[0].text, PROMPTS[:4]))
        assert texts == [expected(engine, i, gen_length=16, **DLLM) for i in ids]
        msgs = [{"role": "user", "content": "What is 3+4?"}]
        want = expected(engine, encode_prompt(engine.tokenizer, msgs[0]["content"], chat=True), gen_length=16)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="default-dream", messages=msgs, max_tokens=16, stream=True) if ch.choices)
        assert streamed == want


# fields of both routes with the values a client might send, right or wrong (None: the key is dropped)
FUZZ_FIELDS = {
    "max_tokens": [1, 4, 0, -1, 10**9, "4", 2.5, None], "temperature": [0, 0.7, -1, 3, "hot", None],
    "top_p": [1, 0.5, 0, None], "n": [1, 2, 0, 65, None], "stream": [True, False, "yes", None],
    "stop": ["\n", ["=", "+"], [""], 5, None], "seed": [0, -1, 2**64, 1.5, None], "steps": [4, 2, 0, 3, None],
    "block_length": [4, 3, 0, None], "sampler": ["low_confidence", "entropy", "random", "nope", None],
    "threshold": [0.9, 0, 1.5, float("inf"), None], "factor": [1.0, -1, None], "cache": ["dual", "prefix", "x", None],
    "refresh": [1, 0, None], "refresh_tokens": [2, -3, None], "preset": ["edge", "reference", "fast", None],
    "stop_at_eos": [True, 1, None], "cfg_scale": [0, 1.5, -2, None], "top_k": [5, 0, None], "alg_temp": [0.1, -1, None],
    "canvas": [True, None], "stream_options": [{"include_usage": True}, {"x": 1}, None],
    "logit_bias": [{"5": 1.0}, None],
    "presence_penalty": [0, 1, None], "model": ["default", "other", 7, None], "user": ["u", None], "bogus": [1],
    "suffix": ["\n", "", 5, None], "logprobs": [0, 2, True, 9, None], "top_logprobs": [1, 30, None],
}


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_fuzzed_requests_never_fail_the_server(route, torch_url):
    """Mixes of right and wrong fields (hypothesis, derandomized): every answer is a 200 with choices
    or an OpenAI-shaped 4xx naming the problem, never a 500 or a traceback, and the server answers
    a plain request after them as before."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    base = ({"prompt": st.sampled_from(["1+1=", "", ["a", "b"], [1, 2, 3], "\ud800", 5])} if route == "completions"
            else {"messages": st.sampled_from([[{"role": "user", "content": "hi"}], [], [{"role": "x", "content": "a"}],
                                               [{"role": "assistant", "content": None}]])})
    fields = st.fixed_dictionaries(base, optional={k: st.sampled_from(v) for k, v in FUZZ_FIELDS.items()})
    valid = {"prompt": "1+1="} if route == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    statuses = []

    # the explicit examples make sure both answers are seen whatever hypothesis's version generates
    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.example(body=valid)
    @hypothesis.example(body={**valid, "stream": True, "n": 2})
    @hypothesis.example(body={**valid, "bogus": 1})
    @hypothesis.given(body=fields)
    def one(body):
        body = {"max_tokens": 4, "steps": 4, **{k: v for k, v in body.items() if v is not None}}
        r = httpx.post(f"{torch_url}/v1/{route}", content=json.dumps(body), timeout=120,
                       headers={"content-type": "application/json"})
        assert r.status_code < 500 and "Traceback" not in r.text, (body, r.status_code, r.text[:300])
        statuses.append(r.status_code)
        if r.status_code != 200:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"], (body, err)
        elif body.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]"), (body, r.text[-200:])
        else:
            assert r.json()["choices"], (body, r.text[:300])

    one()
    assert statuses.count(200) >= 2 and statuses.count(400) >= 1, sorted(statuses)  # both paths were exercised
    r = httpx.post(f"{torch_url}/v1/completions", json={"prompt": "1+1=", "max_tokens": 4, "steps": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_fuzzed_settings_answer_as_generate_does(torch_engine, torch_url):
    """Random valid decoding settings (hypothesis, derandomized): the completion's text is what
    `generate` alone decodes with those settings, streamed or not, and `usage` counts the prompt."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    client = openai.OpenAI(base_url=f"{torch_url}/v1", api_key="x", max_retries=0)

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                         phases=(hypothesis.Phase.generate,), suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(prompt=st.sampled_from(PROMPTS), blocks=st.sampled_from([1, 2]), block=st.sampled_from([4, 8]),
                      per_block=st.sampled_from([1, 2, 4]), sampler=st.sampled_from([None, "low_confidence", "random"]),
                      threshold=st.sampled_from([None, 0.5, 0.9]), cache=st.sampled_from([None, "prefix", "dual"]),
                      temperature=st.sampled_from([0.0, 0.8]), seed=st.sampled_from([None, 7]),
                      stop_at_eos=st.sampled_from([None, True]), stream=st.booleans())
    def one(prompt, blocks, block, per_block, sampler, threshold, cache, temperature, seed, stop_at_eos, stream):
        if (temperature or sampler == "random") and seed is None:
            seed = 11  # a draw without a seed is its own answer: nothing to compare against
        if threshold is not None and sampler == "random":
            sampler = None
        ext = {k: v for k, v in dict(steps=blocks * per_block, block_length=block, sampler=sampler, threshold=threshold,
                                     cache=cache, stop_at_eos=stop_at_eos).items() if v is not None}
        kw = dict(model="default", prompt=prompt, max_tokens=blocks * block, temperature=temperature, seed=seed,
                  extra_body=ext)
        if stream:
            text = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw))
        else:
            r = client.completions.create(**kw)
            text = r.choices[0].text
            assert r.usage.prompt_tokens == len(encode_prompt(torch_engine.tokenizer, prompt))
        ids = encode_prompt(torch_engine.tokenizer, prompt)
        want = expected(torch_engine, ids, gen_length=blocks * block, temperature=temperature, seed=seed,
                        **{"cache": "none", **ext})
        assert text == want, (kw, text, want)

    one()


def test_requests_join_a_running_decoding(torch_engine, torch_url):
    """Continuous batching: a request that arrives while another decodes joins it at the next block
    boundary (it shares the decoding: batch_rows 2, though the first started alone) instead of
    waiting for it to end, and its answer and logprobs are its decoding alone's. The long request
    streams, so the second is sent once the first is under way."""
    c = client(torch_url)
    kw = {"steps": 128, "block_length": 32}
    want, long_want = (expected(torch_engine, encode_prompt(torch_engine.tokenizer, p), gen_length=128, **kw)
                       for p in (PROMPTS[0], PROMPTS[3]))
    long = c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=128, stream=True, extra_body=kw)
    first = next(iter(long))  # the long request is decoding
    # it asks for logprobs, which the running decoding did not record: recording starts as it joins
    r = c.completions.create(model="default", prompt=PROMPTS[0], max_tokens=128, logprobs=2, extra_body=kw)
    rest = "".join(ch.choices[0].text for ch in long if ch.choices)
    assert r.choices[0].text == want
    alone = generate(torch_engine.backend, encode_prompt(torch_engine.tokenizer, PROMPTS[0]), gen_length=128,
                     logprobs=2, **kw)
    k = r.usage.completion_tokens
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(alone.logprobs[0, :k].tolist(), abs=1e-5)
    assert r.model_extra["dllm"]["batch_rows"] == 2
    assert r.model_extra["dllm"]["nfe"] < 128  # its own steps (an early answer), not the decoding's
    metrics = httpx.get(f"{torch_url}/metrics").text
    assert float(next(x for x in metrics.splitlines() if x.startswith("dllm_joined_requests_total ")).split()[1]) >= 1
    assert first.choices[0].text + rest == long_want


def test_queued_requests_join_in_arrival_order(torch_engine):
    """At a block boundary queued requests join from the queue's head while they have the running
    decoding's settings and fit its free rows: the first that does not stops the scan, so that it
    runs next and no request waits behind later ones."""
    import asyncio

    from dllm_export.runtime.loop import Decoding
    from dllm_export.serve.batcher import _Running

    b = Batcher(torch_engine, max_batch=4)  # not started: _join_queued is called here
    loop = asyncio.new_event_loop()
    job = lambda gen, rows=1, block=8: Job(rows=[[1, 2]] * rows, loop=loop, events=asyncio.Queue(),  # noqa: E731
                                           settings=GenSettings(gen_length=gen, steps=gen, block_length=block),
                                           deadline=time.monotonic() + 60)
    first = job(16)
    run = _Running(b, [first])
    run.dec = Decoding.create(torch_engine.backend, **first.settings.kwargs())
    assert run.join(first)
    run.dec.run_block()
    same, other, later = job(32), job(32, block=16), job(16)  # other blocks: `other` cannot join
    for j in (same, other, later):
        b.submit(j)
    b._join_queued(run)
    assert run.jobs == [first, same] and list(b._pending) == [other, later]
    b._pending.remove(other)
    big = job(16, rows=3)  # 2 rows free: it waits, and so does the one behind it
    b._pending.appendleft(big)
    b._join_queued(run)
    assert run.jobs == [first, same] and list(b._pending) == [big, later]
    assert run.dec.start.tolist() == [2, 10] and run.dec.hi == 10  # the second joined at the boundary
    loop.close()


@pytest.mark.parametrize("a,b,shared", [
    (dict(gen_length=64, block_length=16), dict(gen_length=32, block_length=16), True),   # 1 step per token
    (dict(gen_length=64, block_length=16, steps=32), dict(gen_length=32, block_length=16, steps=16), True),
    (dict(gen_length=64, block_length=16, steps=32), dict(gen_length=32, block_length=16), False),  # 8 vs 16 a block
    (dict(gen_length=64), dict(gen_length=32), False),  # one block each: 64 vs 32 wide
    (dict(gen_length=64, block_length=16, threshold=0.9, steps=64), dict(gen_length=32, block_length=16,
                                                                         threshold=0.9, steps=4), True),
    (dict(gen_length=64, block_length=16), dict(gen_length=32, block_length=16, cache="dual"), False),
])
def test_requests_of_other_lengths_share_a_decoding_when_their_blocks_match(a, b, shared):
    assert (GenSettings(**a).batch_key() == GenSettings(**b).batch_key()) is shared


def test_requests_of_other_lengths_batch_and_join(torch_engine, torch_url):
    """Requests with other max_tokens but the same blocks share a decoding, and each is answered as
    its decoding alone at its own length."""
    tok, c = torch_engine.tokenizer, client(torch_url)
    cases = [(PROMPTS[1], 16), (PROMPTS[0], 32), (PROMPTS[3], 48), (PROMPTS[6], 8)]
    want = {p: expected(torch_engine, encode_prompt(tok, p), gen_length=n, steps=n, block_length=8) for p, n in cases}

    def ask(case):
        p, n = case
        r = c.completions.create(model="default", prompt=p, max_tokens=n, extra_body={"steps": n, "block_length": 8})
        return p, r.choices[0].text, r.model_extra["dllm"]["batch_rows"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases * 3))
    assert all(text == want[p] for p, text, _ in answers)
    assert max(rows for _, _, rows in answers) > 1


def test_a_client_leaving_during_a_boundary_keeps_rows_and_jobs_in_step(torch_engine):
    """A streamed request's client may leave (its job cancelled from the server's thread) while the
    worker retires rows at a block boundary: the rows retired and the jobs kept come from one
    reading, so the decoding's rows stay those of its jobs (a second reading once gave a 500)."""
    import asyncio

    from dllm_export.runtime.loop import Decoding
    from dllm_export.serve.batcher import _Running

    class Leaving(Job):  # its client leaves between the worker's second and third look
        reads = 0

        @property
        def cancelled(self):
            self.reads += 1
            return self.reads > 2

        @cancelled.setter
        def cancelled(self, value):
            pass

    b = Batcher(torch_engine, max_batch=4)
    loop = asyncio.new_event_loop()
    # the first request ends at the first boundary (its rows retire), the second one block later
    jobs = [cls(rows=[[1, 2]], settings=GenSettings(gen_length=n, steps=n, block_length=8), loop=loop,
                events=asyncio.Queue(), deadline=time.monotonic() + 60) for cls, n in ((Job, 8), (Leaving, 16))]
    run = _Running(b, jobs)
    run.dec = Decoding.create(torch_engine.backend, **jobs[0].settings.kwargs())
    assert all(run.join(j) for j in jobs)
    jobs[1].reads = 0
    for _ in range(2):
        run.dec.run_block()
        run.boundary()
        assert run.dec.x.shape[0] == sum(len(j.rows) for j in run.jobs)
    loop.close()


@pytest.mark.parametrize("extra", [{}, {"preset": "edge"}])
def test_mixed_requests_under_load_equal_their_decodings_alone(torch_engine, torch_url, extra):
    """16 requests of other prompts, lengths (8 to 24 tokens in blocks of 8), suffixes or none,
    streamed or not, arriving at random times: they join each other's decodings at block
    boundaries, and each text is its decoding alone."""
    import random

    tok, c = torch_engine.tokenizer, client(torch_url)
    rng = random.Random(3)
    cases = [(rng.choice(PROMPTS), rng.choice([8, 16, 24]), rng.random() < 0.5, rng.choice([None, "\n\nprint(x)"]),
              rng.random() * 0.6) for _ in range(16)]
    fast = {"cache": "dual", "threshold": 0.99, "refresh_tokens": 16, "stop_at_eos": True} if extra else {}
    want = [expected(torch_engine, encode_prompt(tok, p), gen_length=n, steps=n, block_length=8,
                     suffix_ids=None if s is None else [encode_prompt(tok, s)], **fast) for p, n, _, s, _ in cases]

    def ask(case):
        p, n, stream, sfx, wait = case
        time.sleep(wait)
        kw = dict(model="default", prompt=p, max_tokens=n, extra_body={"steps": n, "block_length": 8, **extra},
                  **({"suffix": sfx} if sfx else {}))
        if stream:
            return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
        return c.completions.create(**kw).choices[0].text

    def joined() -> float:
        metrics = httpx.get(f"{torch_url}/metrics").text.splitlines()
        return float(next(x for x in metrics if x.startswith("dllm_joined_requests_total ")).split()[1])

    before = joined()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, cases))
    assert got == want
    assert joined() > before


def test_a_default_block_length_lets_requests_of_other_lengths_share(torch_engine):
    """`--block-length`: requests that name no block length decode in blocks of it where it divides
    their max_tokens and steps (each as `generate` with that block length), so requests of other
    lengths share decodings; where it does not divide them a request is one block, as before."""
    tok = torch_engine.tokenizer
    engine = load_engine("default", default_block_length=8)
    cases = [(PROMPTS[1], 16, None, 8), (PROMPTS[0], 32, 16, 8), (PROMPTS[3], 24, None, 8), (PROMPTS[6], 12, None, None),
             (PROMPTS[2], 16, 9, None)]  # 12 tokens: not whole blocks of 8; 9 steps: not whole steps per block
    want = {p: expected(engine, encode_prompt(tok, p), gen_length=n, steps=steps or n, block_length=b or n)
            for p, n, steps, b in cases}
    with running(engine, ServeConfig(max_batch=8, batch_wait=0.05)) as url:
        c = client(url)

        def ask(case):
            p, n, steps, _ = case
            r = c.completions.create(model="default", prompt=p, max_tokens=n,
                                     extra_body={} if steps is None else {"steps": steps})
            return p, r.choices[0].text, r.model_extra["dllm"]["batch_rows"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, cases * 2))
    assert all(text == want[p] for p, text, _ in answers)
    assert max(rows for p, _, rows in answers if p in (PROMPTS[1], PROMPTS[3])) > 1
    with pytest.raises(InputError, match="default_block_length must be >= 1"):
        load_engine("default", default_block_length=0)
