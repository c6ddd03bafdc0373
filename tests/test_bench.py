"""bench's reading of its own numbers: a llama.cpp artifact slower per step than the fastest one
of the run is named with that artifact and the factor, in the JSON and the table."""

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
