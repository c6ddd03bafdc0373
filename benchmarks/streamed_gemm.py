"""A block step's GEMMs as onnxruntime runs them: 16 distinct [K, N] weights at M rows, so the weights
stream from memory as in a decode (one repeated weight stays in the caches and flatters a kernel).

Kernels: the u8 x s8 GEMM the exporter's integer layers run (DynamicQuantizeMatMul), MatMulNBits
4-bit at accuracy level 4 (int8 dot products on 4-bit weights: half the bytes streamed) in blocks of
128 and 256, and grouped int8 weights as one batched MatMulIntegerToFloat (B [K/128, 128, N] with a
scale per group and column, summed over groups): the ways to run grouped 4-bit weights on int8 units.

    python benchmarks/streamed_gemm.py [--m 32 --k 1536 --n 4096 --layers 16 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _nodes(kind: str, i: int, K: int, N: int, rng) -> tuple[list, list]:
    """Nodes and initializers of layer i (input "a", output f"y{i}")."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    if kind == "u8s8":
        inits = [nh.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), f"w{i}"),
                 nh.from_array(np.full(N, 1e-3, np.float32), f"ws{i}")]
        return [h.make_node("DynamicQuantizeMatMul", ["a", f"w{i}", f"ws{i}", "", ""], [f"y{i}"],
                            domain="com.microsoft")], inits
    if kind.startswith("nbits"):
        bs = int(kind[5:])
        codes = rng.integers(0, 16, (N, K // bs, bs), dtype=np.uint8)
        inits = [nh.from_array((codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), f"b{i}"),
                 nh.from_array(rng.random((N, K // bs), dtype=np.float32) * 0.01 + 1e-3, f"s{i}")]
        return [h.make_node("MatMulNBits", ["a", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft", K=K, N=N,
                            bits=4, block_size=bs, accuracy_level=4)], inits
    G = K // 128  # "grouped": int8 codes per group of 128, batched over the groups
    inits = [nh.from_array(rng.integers(-8, 8, (G, 128, N), dtype=np.int8), f"gw{i}"),
             nh.from_array(rng.random((G, 1, N), dtype=np.float32) * 0.01 + 1e-3, f"gs{i}")]
    return [h.make_node("MatMulIntegerToFloat", ["ag", f"gw{i}", "a_scale", f"gs{i}"], [f"p{i}"],
                        domain="com.microsoft"),
            h.make_node("ReduceSum", [f"p{i}", "axis0"], [f"y{i}"], keepdims=0)], inits


def _grouped_input(M: int, K: int) -> tuple[list, list]:
    """The activation codes split into groups of 128 along K: [K/128, M, 128] int8."""
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    return ([h.make_node("Mul", ["a", "inv_scale"], ["as"]), h.make_node("Cast", ["as"], ["aq"], to=TensorProto.INT8),
             h.make_node("Reshape", ["aq", "shape"], ["ar"]), h.make_node("Transpose", ["ar"], ["ag"], perm=[1, 0, 2])],
            [nh.from_array(np.array(10.0, np.float32), "inv_scale"),
             nh.from_array(np.array([M, K // 128, 128], np.int64), "shape"),
             nh.from_array(np.array(0.1, np.float32), "a_scale"), nh.from_array(np.array([0], np.int64), "axis0")])


def measure(kind: str, M: int, K: int, N: int, layers: int, threads: int, reps: int) -> dict:
    """Best and median ms of one run over `layers` distinct weights, and the int8-op rate it reaches."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as h

    rng = np.random.default_rng(0)
    nodes, inits = _grouped_input(M, K) if kind == "grouped" else ([], [])
    outs = []
    for i in range(layers):
        n, ini = _nodes(kind, i, K, N, rng)
        nodes += [*n, h.make_node("ReduceSum", [f"y{i}"], [f"r{i}"], keepdims=0)]  # every layer runs, tiny outputs
        inits += ini
        outs.append(h.make_tensor_value_info(f"r{i}", TensorProto.FLOAT, []))
    graph = h.make_graph(nodes, kind, [h.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])], outs,
                         initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((M, K), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"a": a})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"a": a})
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"best_ms": round(1000 * ts[0], 2), "median_ms": round(1000 * ts[len(ts) // 2], 2),
            "tops": round(2 * M * K * N * layers / ts[0] / 1e12, 3)}


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="the kernels in turns, this many times (best kept)")
    ap.add_argument("--out", default="benchmarks/results/streamed_gemm.json")
    args = ap.parse_args(argv)
    kinds = ("u8s8", "nbits128", "nbits256", "grouped")
    runs: dict[str, list] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            runs[k].append(measure(k, args.m, args.k, args.n, args.layers, args.threads, args.reps))
    res = {"shape": {"M": args.m, "K": args.k, "N": args.n, "layers": args.layers}, "threads": args.threads,
           "onnxruntime": ort.__version__, "kernels": {k: min(v, key=lambda r: r["best_ms"]) for k, v in runs.items()}}
    for k, r in res["kernels"].items():
        print(f"{k:9s} best {r['best_ms']:8.2f} ms  median {r['median_ms']:8.2f} ms  {r['tops']:.3f} TOP/s")
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
