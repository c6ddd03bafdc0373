"""Ollama's API on `dllm-export serve`, driven by the official `ollama` client: /api/generate (raw,
templated, infilling) and /api/chat, streamed and not, give what `generate` gives; logprobs equal
the OpenAI route's; the model routes; refusals in Ollama's error shape."""

import json

import pytest

ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from dllm_export.serve import ServeConfig  # noqa: E402
from dllm_export.serve.ollama import openai_fields  # noqa: E402
from dllm_export.serve.engine import RequestError  # noqa: E402
from dllm_export.tokenizer import encode_prompt  # noqa: E402

from .test_serve import client, expected, one_thread, running, torch_engine, torch_url  # noqa: E402,F401  (fixtures)

OPTS = {"num_predict": 16, "steps": 16, "block_length": 8}
DLLM = {"gen_length": 16, "steps": 16, "block_length": 8}


@pytest.mark.parametrize("stream", [False, True])
def test_raw_generate_equals_generate(torch_engine, torch_url, stream):
    ids = encode_prompt(torch_engine.tokenizer, "def fibonacci(n):")
    want = expected(torch_engine, ids, **DLLM)
    c = ollama.Client(host=torch_url)
    if stream:
        parts = list(c.generate(model="default", prompt="def fibonacci(n):", raw=True, options=OPTS, stream=True))
        text, last = "".join(p.response for p in parts), parts[-1]
        assert all(not p.done for p in parts[:-1]) and last.response == ""
    else:
        last = c.generate(model="default", prompt="def fibonacci(n):", raw=True, options=OPTS)
        text = last.response
    assert text == want and last.done and last.done_reason in ("stop", "length")
    assert last.prompt_eval_count == len(ids) and 0 < last.eval_count <= 16
    assert last.total_duration >= last.eval_duration > 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_and_templated_generate_equal_generate(torch_engine, torch_url, stream):
    """/api/chat and /api/generate (system + prompt, not raw) go through the chat template."""
    c = ollama.Client(host=torch_url)
    msgs = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 12+7?"}]
    want = expected(torch_engine, torch_engine.encode_chat(msgs), **DLLM)
    if stream:
        chat = "".join(p.message.content for p in c.chat(model="default", messages=msgs, options=OPTS, stream=True))
        gen = "".join(p.response for p in c.generate(model="default", system=msgs[0]["content"],
                                                     prompt=msgs[1]["content"], options=OPTS, stream=True))
    else:
        r = c.chat(model="default", messages=msgs, options=OPTS)
        assert r.message.role == "assistant" and r.done
        chat = r.message.content
        gen = c.generate(model="default", system=msgs[0]["content"], prompt=msgs[1]["content"], options=OPTS).response
    assert chat == want and gen == want


def test_generate_with_a_suffix_infills(torch_engine, torch_url):
    from dllm_export import generate

    prompt, suffix = "def add(a, b):\n    ", "\n\nprint(add(2, 3))"
    ids, sfx = encode_prompt(torch_engine.tokenizer, prompt), encode_prompt(torch_engine.tokenizer, suffix)
    row = generate(torch_engine.backend, ids, suffix_ids=[sfx], **DLLM).generated[0].tolist()
    r = ollama.Client(host=torch_url).generate(model="default", prompt=prompt, suffix=suffix, options=OPTS)
    assert r.response == torch_engine.text(row)[0]


def test_options_map_to_the_openai_fields():
    assert openai_fields({"num_predict": -1, "temperature": 0.5, "top_k": 3, "stop": ["\n"], "steps": 8,
                          "threshold": 0.9, "num_ctx": 4096, "repeat_penalty": 1.0, "num_thread": 2}) == \
        {"max_tokens": None, "temperature": 0.5, "top_k": 3, "stop": ["\n"], "steps": 8, "threshold": 0.9}
    for bad in ({"repeat_penalty": 1.1}, {"mirostat": 2}, {"bogus": 1}):
        with pytest.raises(RequestError, match="option"):
            openai_fields(bad)


def test_logprobs_equal_the_openai_routes(torch_url):
    """Each token's log-probability and its position's top ones, as /v1/chat/completions gives them
    (the same decoding), streamed or not."""
    msgs = [{"role": "user", "content": "What is 12+7?"}]
    ref = client(torch_url).chat.completions.create(model="default", messages=msgs, max_tokens=16, logprobs=True,
                                              top_logprobs=2, extra_body={"steps": 16, "block_length": 8})
    want = [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
            for t in ref.choices[0].logprobs.content]
    c = ollama.Client(host=torch_url)
    r = c.chat(model="default", messages=msgs, options=OPTS, logprobs=True, top_logprobs=2)
    parts = list(c.chat(model="default", messages=msgs, options=OPTS, logprobs=True, top_logprobs=2, stream=True))
    assert len(want) == ref.usage.completion_tokens
    for got in (r.logprobs, [lp for p in parts for lp in p.logprobs or []]):
        got = [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in got]
        assert [(t, [x for x, _ in top]) for t, _, top in got] == [(t, [x for x, _ in top]) for t, _, top in want]
        flat = lambda rows: [v for _, lp, top in rows for v in [lp] + [y for _, y in top]]  # noqa: E731
        assert flat(got) == pytest.approx(flat(want), abs=1e-6)


def test_model_routes(torch_engine, torch_url):
    c = ollama.Client(host=torch_url)
    assert [m.model for m in c.list().models] == ["default"]
    assert c.list().models[0].details.family == "llada"
    shown = c.show("default")
    assert shown.modelinfo["llada.context_length"] == torch_engine.context and "completion" in shown.capabilities
    assert c.ps().models[0].context_length == torch_engine.context
    assert httpx.get(f"{torch_url}/api/version").json()["version"]
    loaded = c.generate(model="default")  # no prompt: Ollama's way to load a model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert c.chat(model="default", messages=[]).done_reason == "load"


@pytest.mark.parametrize("route,body,status,words", [
    ("generate", {"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ("chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ("generate", {"model": "default", "prompt": "x", "options": {"repeat_penalty": 1.3}}, 400, "repeat_penalty"),
    ("generate", {"model": "default", "prompt": "x", "options": {"bogus": 1}}, 400, "unknown option 'bogus'"),
    ("generate", {"model": "default", "prompt": "x", "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("generate", {"model": "default", "prompt": "x", "options": {"num_predict": 3, "block_length": 2}}, 400,
     "max_tokens"),
    ("generate", {"model": "default", "prompt": "x", "format": "json"}, 400, "format"),
    ("generate", {"model": "default", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("generate", {"model": "default", "prompt": "x", "template": "{{ .Prompt }}"}, 400, "template"),
    ("generate", {"model": "default", "prompt": "x", "context": [1, 2]}, 400, "/api/chat"),
    ("generate", {"model": "default", "prompt": "x", "raw": True, "system": "s"}, 400, "system"),
    ("generate", {"model": "default", "prompt": "x", "steps": 8, "options": {"steps": 16}}, 400, "steps"),
    ("generate", {"model": "default", "prompt": "x", "bogus": 1}, 400, "unknown field 'bogus'"),
    ("generate", {"model": "default", "prompt": "x", "options": {"num_predict": 999999}}, 400, "max_tokens"),
    ("chat", {"model": "default", "messages": [{"role": "tool", "content": "4"}]}, 400, "tool"),
    ("chat", {"model": "default", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400, "tools"),
    ("chat", {"model": "default", "messages": [{"role": "user", "content": "x"}], "think": True}, 400, "think"),
    ("chat", {"model": "default", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
])
def test_bad_requests_get_ollamas_error_shape(torch_url, route, body, status, words):
    """Refused before any decoding: the status, and {"error": message} naming the problem (what the
    official client raises as ResponseError), streamed or not."""
    for stream in (False, True):
        r = httpx.post(f"{torch_url}/api/{route}", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == status and set(r.json()) == {"error"} and words in r.json()["error"], r.text
    if "bogus" not in body:  # a field the client has no argument for
        with pytest.raises(ollama.ResponseError) as e:
            getattr(ollama.Client(host=torch_url), route)(**body)
        assert e.value.status_code == status and words in e.value.error


def test_api_key_guards_the_ollama_routes(torch_engine):
    with running(torch_engine, ServeConfig(api_key="k")) as u:
        r = httpx.post(f"{u}/api/generate", json={"model": "default", "prompt": "1+1=", "options": OPTS})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        ok = ollama.Client(host=u, headers={"Authorization": "Bearer k"}).generate(
            model="default", prompt="1+1=", raw=True, options=OPTS)
        assert ok.done


def test_streamed_lines_are_ndjson(torch_url):
    with httpx.stream("POST", f"{torch_url}/api/generate", json={"model": "default", "prompt": "7*8=", "raw": True,
                                                           "options": OPTS}, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])


OPTION_FUZZ = {"num_predict": [4, -1, 0, 3, "4", 10**9], "temperature": [0, 0.5, -1, "x"], "top_k": [3, 0, 1.5],
               "top_p": [0.9, 0, 2], "seed": [1, "s"], "stop": [["\n"], "\n", [""], 5], "steps": [4, 0, 2.5],
               "block_length": [4, 3, 0], "threshold": [0.9, 2], "cache": ["dual", "x"], "preset": ["edge", "nope"],
               "num_ctx": [4096], "repeat_penalty": [1.0, 1.2], "mirostat": [0, 1], "bogus": [1]}
BODY_FUZZ = {"stream": [True, False, "yes"], "raw": [True, False, 1], "system": ["s", 5], "suffix": ["\n", ""],
             "format": ["", "json", {"type": "object"}], "keep_alive": ["5m", 0, -1], "think": [False, True],
             "logprobs": [True, False], "top_logprobs": [2, 30], "images": [[], ["aGk="]], "template": ["", "t"],
             "context": [[], [1]], "steps": [4, "4"], "model": ["default", "nope", 7, ""], "bogus": [1]}


@pytest.mark.parametrize("route", ["generate", "chat"])
def test_fuzzed_requests_never_fail_the_server(torch_url, route):
    """Mixes of right and wrong fields and options (hypothesis, derandomized): every answer is a 200
    (NDJSON lines ending in a done object, or one done object) or a 4xx {"error": one line}; never
    a 500 or a traceback."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    base = ({"prompt": st.sampled_from(["1+1=", "", "\ud800", 5])} if route == "generate"
            else {"messages": st.sampled_from([[{"role": "user", "content": "hi"}], [], [{"role": "x"}],
                                               [{"role": "user", "content": "hi", "images": ["aGk="]}]])})
    body_fields = {k: v for k, v in BODY_FUZZ.items()
                   if route == "generate" or k in ("stream", "format", "keep_alive", "think", "logprobs",
                                                   "top_logprobs", "model", "bogus")}
    options = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in OPTION_FUZZ.items()})
    fields = st.fixed_dictionaries({**base, "options": options},
                                   optional={k: st.sampled_from(v) for k, v in body_fields.items()})
    statuses = []

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                         phases=(hypothesis.Phase.generate,), suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(body=fields)
    def one(body):
        body = {"model": "default", **body, "options": {"num_predict": 4, "steps": 4, **body["options"]}}
        r = httpx.post(f"{torch_url}/api/{route}", content=json.dumps(body), timeout=120,
                       headers={"content-type": "application/json"})
        assert r.status_code < 500 and "Traceback" not in r.text, (body, r.status_code, r.text[:300])
        statuses.append(r.status_code)
        if r.status_code != 200:
            err = r.json()
            assert set(err) == {"error"} and isinstance(err["error"], str) and "\n" not in err["error"], (body, err)
            return
        lines = [json.loads(line) for line in r.text.splitlines() if line]
        assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1]), (body, r.text[-300:])

    one()
    assert statuses.count(200) >= 2 and statuses.count(400) >= 2, sorted(statuses)


def test_a_request_that_times_out_says_so(torch_engine):
    """Past the server's timeout: a 408 {"error"} before any line, or an error line in a stream (the
    official client raises ResponseError either way)."""
    body = {"model": "default", "prompt": "def fibonacci(n):", "raw": True,
            "options": {"num_predict": 256, "steps": 256, "block_length": 256}}
    with running(torch_engine, ServeConfig(timeout=0.3)) as u:
        r = httpx.post(f"{u}/api/generate", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 408 and r.json() == {"error": "the request timed out"}
        with httpx.stream("POST", f"{u}/api/generate", json=body, timeout=60) as s:
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert lines[-1] == {"error": "the request timed out"}
        with pytest.raises(ollama.ResponseError, match="timed out"):
            list(ollama.Client(host=u).generate(**body, stream=True))
