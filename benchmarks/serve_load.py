"""`dllm-export serve` under load: throughput and latency at 1, 4, 8 and 16 concurrent clients.

The server runs as its own process (`python -m dllm_export.cli serve`), as a user runs it; each
client is a thread with its own HTTP connection that sends /v1/completions requests back to back
(a closed loop), greedy, with the same settings, so that the server may batch them. Throughput is
generated tokens per second over all clients (max_tokens per answered request: a diffusion LM
decodes the whole canvas; `returned` counts the tokens before the first end token), latency is per
request (p50 / p95). Every answer is checked against the one-client answer of the same prompt.
Request settings: the reference loop (a full forward over the canvas every step), Fast-dLLM's dual
cache (only the current block is recomputed between block starts), and the edge preset
(`--variants edge`). With `--rates`, an open loop instead: requests arrive at Poisson times of a
given rate whatever the server's state (as independent users send them), which is where joining a
running decoding (continuous batching) shows, in the latency from arrival to answer.

    python benchmarks/serve_load.py                          # bundled model, max_tokens 32, block 8
    python benchmarks/serve_load.py --model out/onnx --clients 1,8 --threads 2
    python benchmarks/serve_load.py --variants edge --rates 1,2 --requests 32 --max-tokens 128 --steps 128 \
        --block-length 16
    python benchmarks/serve_load.py --variants dual --rates 1.5 --max-tokens 64,128 --block-length 0 \
        --server-block-length 16     # mixed lengths, requests naming no block length (the server's --block-length)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import host_info, save_results  # noqa: E402  (same folder)
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\nimport sys\n",
           "x = [1, 2, 3]\nfor i in x:", "def read_file(path):", "The quick brown fox", "12+34=", "7*8="]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dllm_export.cli", "serve", args.model, "--port", str(port), "--threads",
           str(args.threads), "--max-batch", str(args.max_batch), "--log-level", "warning",
           "--batch-wait-ms", str(args.batch_wait_ms)]
    if args.server_block_length:
        cmd += ["--block-length", str(args.server_block_length)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


def run_level(url: str, clients: int, per_client: int, body: dict) -> dict:
    """`clients` threads, each sending `per_client` requests back to back; latencies and answers."""
    results: list[tuple[str, float, dict]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(per_client):
                prompt = PROMPTS[(k * per_client + j) % len(PROMPTS)]
                t0 = time.perf_counter()
                r = http.post("/v1/completions", json=request(body, prompt))
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    results.append((prompt, dt, r.json()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(results, time.perf_counter() - t0, body, clients=clients)


def run_open(url: str, rate: float, requests: int, body: dict, seed: int = 0) -> dict:
    """An open loop: `requests` requests sent at Poisson arrival times of `rate` per second (seeded),
    each on its own connection whatever the server's state, as independent users send them; the
    latency of each from its arrival to its answer."""
    import random

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    results: list[tuple[str, float, dict]] = []
    lock = threading.Lock()

    def send(k: int, t0: float) -> None:
        time.sleep(max(0.0, t0 + arrivals[k] - time.perf_counter()))
        prompt = PROMPTS[k % len(PROMPTS)]
        sent = time.perf_counter()
        with httpx.Client(base_url=url, timeout=600) as http:
            r = http.post("/v1/completions", json=request(body, prompt))
        r.raise_for_status()
        with lock:
            results.append((prompt, time.perf_counter() - sent, r.json()))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(k, t0)) for k in range(requests)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _summary(results, time.perf_counter() - t0, body, rate=rate)


def request(body: dict, prompt: str) -> dict:
    """The request body of `prompt`: its max_tokens (and steps, 1 a token, when the body has none)
    by its place in PROMPTS, so that each prompt keeps its length whatever the level."""
    lengths = body["max_tokens"]
    n = lengths[PROMPTS.index(prompt) % len(lengths)]
    return {**body, "prompt": prompt, "max_tokens": n, "steps": body.get("steps") or n}


def _summary(results: list[tuple[str, float, dict]], wall: float, body: dict, **level) -> dict:
    """Throughput, latency percentiles, batch rows and answers of one level's requests."""
    lat = sorted(dt for _, dt, _ in results)
    n = len(results)
    returned = sum(r["usage"]["completion_tokens"] for _, _, r in results)
    generated = sum(request(body, p)["max_tokens"] for p, _, _ in results)
    return {
        **level, "requests": n, "wall_s": round(wall, 3),
        "tokens_per_s": round(generated / wall, 2), "returned_tokens_per_s": round(returned / wall, 2),
        "requests_per_s": round(n / wall, 3),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p95_s": round(lat[min(n - 1, int(round(0.95 * (n - 1))))], 3),
        # arithmetic prompts end in their first block (an early answer): what joining a running decoding shows most
        "latency_p50_arithmetic_s": round(statistics.median([dt for p, dt, _ in results if p.endswith("=")] or [0]), 3),
        "mean_batch_rows": round(statistics.mean(r["dllm"]["batch_rows"] for _, _, r in results), 2),
        "answers": {p: r["choices"][0]["text"] for p, _, r in results},
    }


# request settings beside max_tokens / steps / block; "edge": the edge preset (dual cache refreshed per row
# after 16 commits, threshold 0.99, stop at EOS), named by the request as an OpenAI client's extra_body does
VARIANTS = {"reference": {}, "dual": {"cache": "dual"}, "edge": {"preset": "edge"}}


def to_markdown(res: dict) -> str:
    s = res["settings"]
    open_loop = bool(s.get("rates"))
    lines = [f"# serve_load: {res['model']} ({res['host']['cpu']}, {res['host']['cpus']} CPUs, "
             f"{s['threads']} torch thread(s) in the server, max_batch {s['max_batch']})", "",
             f"max_tokens {s['body']['max_tokens']}, steps {s['body'].get('steps', 'max_tokens')}, block_length "
             f"{s['body'].get('block_length', 'none sent')} (server's: {s.get('server_block_length')}), greedy; "
             + (f"open loop: {s['requests']} requests at Poisson arrivals of each rate (seeded), latency from "
                f"arrival to answer" if open_loop else
                f"at least {s['per_client']} requests per client (8 in all at 1 client)")
             + f"; tokens/s = max_tokens x answered requests / wall time; medians of {s['repeats']} rounds "
             f"over the levels.", "",
             f"| settings | {'rate (requests/s)' if open_loop else 'clients'} | requests | tokens/s | "
             f"{'requests/s' if open_loop else 'x 1 client'} | p50 latency (s) | p95 latency (s) "
             "| p50 latency, arithmetic (s) | mean batch rows | answers equal to 1 client |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for name, levels in res["variants"].items():
        for lv in levels:
            lines.append(f"| {name} {json.dumps(VARIANTS.get(name, {}))} | {lv['rate' if open_loop else 'clients']} | "
                         f"{lv['requests']} | {lv['tokens_per_s']:.1f} | "
                         f"{lv['requests_per_s'] if open_loop else format(lv['speedup'], '.2f')} | "
                         f"{lv['latency_p50_s']} | {lv['latency_p95_s']} | {lv.get('latency_p50_arithmetic_s', '')} | "
                         f"{lv['mean_batch_rows']} | "
                         f"{'yes' if lv['equal_to_single'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def measure(url: str, body: dict, clients: list[int], per_client: int, repeats: int,
            rates: list[float] | None = None, requests: int = 32) -> list[dict]:
    """Every level of one request setting, `repeats` rounds over the levels interleaved (the host is
    shared: each figure is the median of its rounds), with answer checks against one client and,
    closed loop, speedups over one client. Levels are client counts, or open-loop arrival rates."""
    single = run_level(url, 1, len(PROMPTS), body)["answers"]  # warm-up, and every prompt's answer alone
    if rates:
        keys = [("rate", r) for r in rates]
        rounds = [[run_open(url, r, requests, body, seed=k) for r in rates] for k in range(repeats)]
    else:
        keys = [("clients", c) for c in clients]
        rounds = [[run_level(url, c, max(per_client, len(PROMPTS) // c), body) for c in clients]
                  for _ in range(repeats)]
    levels = []
    for k, (key, value) in enumerate(keys):
        runs = [r[k] for r in rounds]
        lv = {m: round(statistics.median(run[m] for run in runs), 3) for m in
              ("wall_s", "tokens_per_s", "returned_tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p95_s",
               "latency_p50_arithmetic_s", "mean_batch_rows")}
        lv.update({key: value}, requests=runs[0]["requests"], tokens_per_s_runs=[run["tokens_per_s"] for run in runs],
                  equal_to_single=all(single[p] == t for run in runs for p, t in run["answers"].items()))
        levels.append(lv)
    base = levels[0]["tokens_per_s"]
    for lv in levels:
        lv["speedup"] = round(lv["tokens_per_s"] / base, 3)
    return levels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"request settings: {', '.join(VARIANTS)}")
    ap.add_argument("--per-client", type=int, default=4, help="requests per client per level")
    ap.add_argument("--rates", default=None, help="open loop instead: Poisson arrival rates (requests/s), e.g. 1,2")
    ap.add_argument("--requests", type=int, default=32, help="requests per open-loop level")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the levels (medians are reported)")
    ap.add_argument("--max-tokens", default="32", help="max_tokens, or a list (a prompt's by its index), e.g. 64,128")
    ap.add_argument("--steps", type=int, default=None, help="steps of every request (default: its max_tokens)")
    ap.add_argument("--block-length", type=int, default=8, help="block_length of every request (0: none sent)")
    ap.add_argument("--server-block-length", type=int, help="the server's --block-length (requests naming none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    args = ap.parse_args()
    body = {"model": args.model if args.model.startswith("default") else Path(args.model).name,
            "max_tokens": [int(n) for n in args.max_tokens.split(",")], "temperature": 0,
            **({"steps": args.steps} if args.steps else {}),
            **({"block_length": args.block_length} if args.block_length else {})}
    clients = [int(c) for c in args.clients.split(",")]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    proc = start_server(args, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        variants = {v: measure(url, {**body, **VARIANTS[v]}, clients, args.per_client, args.repeats, rates,
                               args.requests) for v in args.variants.split(",")}
    finally:
        proc.terminate()
        proc.wait(60)
    res = {"model": args.model, "host": host_info(),
           "settings": {"threads": args.threads, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
                        "server_block_length": args.server_block_length,
                        "per_client": args.per_client, "repeats": args.repeats, "body": body,
                        "rates": rates, "requests": args.requests},
           "variants": variants}
    save_results(res, args.out, to_markdown(res))
    print(to_markdown(res), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
