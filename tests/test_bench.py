"""bench's reading of its own numbers: a llama.cpp artifact slower per step than the fastest one
of the run is named with that artifact and the factor, in the JSON and the table."""

from dllm_export.bench import _flag_slower_llamacpp, to_markdown


def _row(path, backend, ms):
    return {"path": path, "backend": backend, "step_ms_median": ms}


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
