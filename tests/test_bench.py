"""bench's reading of its own numbers: a llama.cpp artifact slower per step than the fastest one
of the run is named with that artifact and the factor, in the JSON and the table; `--profile` ranks a
decode's op types by the time its runtime's profiler gave them."""

import pytest

from dllm_export.bench import _flag_slower_llamacpp, to_markdown


def _row(path, backend, ms):
    return {"path": path, "backend": backend, "step_ms_median": ms, "host_load": 1.0, "host_cores": 2}


def test_slower_llamacpp_rows_name_the_faster_artifact():
    rows = [_row("ckpt", "torch", 100.0), _row("onnx-w8a8", "onnxruntime", 40.0), _row("q4.gguf", "llama.cpp", 130.0),
            {"path": "gone", "error": "model folder not found"}]
    _flag_slower_llamacpp(rows)
    assert rows[2]["faster"] == {"path": "onnx-w8a8", "backend": "onnxruntime", "x": 3.25}
    assert "faster" not in rows[0] and "faster" not in rows[1]
    table = to_markdown({"config": {"quality": False}, "artifacts": rows})
    assert "llama.cpp (q4.gguf) is 3.25x slower per step than onnx-w8a8 (onnxruntime)" in table
    fast = [_row("ckpt", "torch", 100.0), _row("q4.gguf", "llama.cpp", 50.0)]
    _flag_slower_llamacpp(fast)
    assert "faster" not in fast[1]  # the fastest of the run is not flagged


def test_gguf_export_names_the_faster_target_on_a_measured_device(tmp_path, capsys):
    from dllm_export.cli import main
    from dllm_export.models.factory import make_random_checkpoint
    from dllm_export.targets import PROFILES

    src = make_random_checkpoint(tmp_path / "ckpt", "llada", vocab_size=384, tokenizer=True, d_model=64,
                                 max_sequence_length=128)
    assert main(["--target", "gguf", "--quant", "F16", "--model", str(src), "--device", "x86-avx512-vnni",
                 "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"  speed: {PROFILES['x86-avx512-vnni'].speed_note}" in out and "faster targets are onnx" in out


def test_ort_op_times_counts_the_runs_after_the_warmup():
    from dllm_export.runtime.ort import ort_op_times

    def node(op, ts, dur):
        return {"cat": "Node", "name": f"{op}_x_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 90}, node("MatMul", 10, 50),
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 90}, node("MatMul", 110, 40),
              node("Add", 160, 5), {"cat": "Node", "name": "MatMul_x_fence_before", "ts": 150, "dur": 7,
                                    "args": {"op_name": "MatMul"}}]
    assert ort_op_times(events) == {"MatMul": [0.09, 2], "Add": [0.005, 1]}
    assert ort_op_times(events, skip_runs=1) == {"MatMul": [0.04, 1], "Add": [0.005, 1]}
    assert ort_op_times(events, skip_runs=2) == {}


@pytest.fixture(scope="module")
def w8a8_onnx(tiny_dirs, tmp_path_factory):
    from dllm_export.exporter import export
    from dllm_export.quant import CalibConfig

    return export(tiny_dirs["llada"], tmp_path_factory.mktemp("prof") / "onnx", target="onnx", scheme="W8A8",
                  method="rtn", quantize_options={"calib": CalibConfig(n_samples=2, seq_len=32)}).path


@pytest.mark.parametrize("kind, gemm", [("torch", "aten::mm"), ("onnx", "MatMulIntegerToFloat")])
def test_op_profile_of_a_decode(kind, gemm, tiny_dirs, w8a8_onnx):
    """bench --profile: the runtime's op types of one decode, the largest first, shares of its wall
    time summing to 1 with the time outside the runtime's ops; the backend decodes as before after."""
    import torch

    from dllm_export import generate
    from dllm_export.bench import op_profile
    from dllm_export.runtime.backends import load_backend

    be = load_backend(tiny_dirs["llada"] if kind == "torch" else w8a8_onnx, threads=1)
    prompt = [[5, 6, 7, 8]]
    before = generate(be, prompt, gen_length=8, steps=8, block_length=8).generated
    p = op_profile(be, lambda: generate(be, prompt, gen_length=8, steps=8, block_length=8), top=3)
    named = p["ops"][:3]
    assert [o["ms"] for o in named] == sorted((o["ms"] for o in named), reverse=True)
    assert any(o["op"] == gemm and o["calls"] >= 8 for o in p["ops"])  # a GEMM op each step at least
    assert p["ops"][-1]["op"] == "(outside the runtime's ops)" and p["ops"][-2]["op"].endswith("other op types)")
    assert sum(o["share"] for o in p["ops"]) == pytest.approx(1.0, abs=2e-3)
    assert torch.equal(generate(be, prompt, gen_length=8, steps=8, block_length=8).generated, before)
    table = to_markdown({"config": {"quality": False}, "artifacts": [{**_row("a", be.name, 1.0), "profile": p}]})
    assert f"| {gemm} |" in table and "under its profiler" in table


def test_op_profile_names_a_backend_without_a_profiler(tiny_dirs):
    from dllm_export import load_model
    from dllm_export.bench import op_profile
    from dllm_export.runtime.backends import as_backend

    model = load_model(tiny_dirs["llada"])

    class Plain:  # a foreign backend: a forward and nothing else
        spec, vocab_size, max_length = model.spec, model.config.dims.vocab_rows, model.config.dims.context

        def forward(self, ids, attention_mask=None):
            return model(ids)

    assert op_profile(as_backend(Plain()), lambda: None) == {
        "error": "the Plain backend has no per-op profiler (onnxruntime and torch have)"}


@pytest.mark.parametrize("args, message", [
    (["MISSING"], "model folder not found"),
    (["MODEL", "--steps", "3"], "steps 3 must be a multiple of the number of blocks 2"),
])
def test_bad_artifact_or_schedule_is_one_line_in_the_table(args, message, tiny_dirs, tmp_path, capsys):
    """Each artifact is measured in its own process: its bad input comes back as that row's one-line
    error (no exception class, no traceback) and bench exits 2."""
    from dllm_export.cli import main

    args = [str(tmp_path / "missing") if a == "MISSING" else str(tiny_dirs["llada"]) if a == "MODEL" else a
            for a in args]
    assert main(["bench", *args, "--no-roofline", "--reps", "1", "--decode-reps", "1", "--canvas", "16"]) == 2
    row = next(line for line in capsys.readouterr().out.splitlines() if "| error: " in line)
    assert message in row and "Error" not in row and "Traceback" not in row
