"""The `dllm-export` CLI: each subcommand end to end on tiny checkpoints, and its error contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_export.cli import main


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_generate_json(tiny_dirs, capsys, name):
    rc = main(["generate", "--model", str(tiny_dirs[name]), "--prompt", "def f(x):", "--prompt", "12+34=",
               "--gen-length", "16", "--steps", "8", "--block-length", "8", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["text"]) == 2 and len(out["commit_step"]) == 2 and len(out["commit_step"][0]) == 16
    assert out["nfe"] == 8 and out["settings"]["block_length"] == 8
    assert out["timings"]["generate_s"] > 0 and out["timings"]["tokens_per_s"] > 0


def test_generate_with_a_cache_across_blocks_is_the_apis(tiny_dirs, capsys):
    """`--cache dual --refresh-blocks 2` decodes as `generate(refresh_blocks=2)`; without a cache it is
    refused in one line (exit 2)."""
    from dllm_export import generate, load_model, load_tokenizer
    from dllm_export.tokenizer import encode_prompt

    model = tiny_dirs["llada"]
    args = ["generate", "--model", str(model), "--prompt", "def f(x):", "--gen-length", "24", "--block-length", "8"]
    assert main([*args, "--cache", "dual", "--refresh-blocks", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = generate(load_model(model), [encode_prompt(load_tokenizer(model), "def f(x):")], gen_length=24,
                    block_length=8, cache="dual", refresh_blocks=2)
    assert out["ids"] == want.ids.tolist() and out["settings"]["refresh_blocks"] == 2
    assert main([*args, "--refresh-blocks", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("refresh_blocks needs a block cache: set cache to 'prefix' or 'dual'") and "\n" not in err


def test_generate_text_with_chat_template(tiny_dirs, capsys):
    args = ["generate", "--model", str(tiny_dirs["llada"]), "--prompt", "hi", "--chat", "--gen-length", "8",
            "--threshold", "0.5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert printed == out["text"][0] + "\n"  # greedy: the same 8 tokens, decoded
    assert len(out["ids"][0]) - out["prompt_length"] == 8 and out["nfe"] <= 8


def test_generate_with_a_suffix_prints_prompt_fill_and_suffix(tiny_dirs, capsys):
    from dllm_export import generate, load_model, load_tokenizer
    from dllm_export.tokenizer import encode_prompt

    model = tiny_dirs["llada"]
    args = ["generate", "--model", str(model), "--prompt", "def f(x):", "--suffix", " return y", "--gen-length", "8"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(model)
    want = generate(load_model(model), [encode_prompt(tok, "def f(x):")], gen_length=8,
                    suffix_ids=[encode_prompt(tok, " return y")])
    assert out["ids"] == want.ids.tolist() and out["suffixes"] == [" return y"]
    assert main(args) == 0
    assert capsys.readouterr().out == "def f(x):" + out["text"][0] + " return y\n"


def test_generate_json_logprobs_are_the_apis(tiny_dirs, capsys):
    from dllm_export import generate, load_model, load_tokenizer
    from dllm_export.tokenizer import encode_prompt

    model = tiny_dirs["dream"]
    assert main(["generate", "--model", str(model), "--prompt", "def f(x):", "--gen-length", "8", "--json",
                 "--logprobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = generate(load_model(model), [encode_prompt(load_tokenizer(model), "def f(x):")], gen_length=8, logprobs=2)
    assert out["logprobs"][0] == pytest.approx(want.logprobs[0].tolist(), abs=1e-9)
    assert [[i for i, _ in pos] for pos in out["top_logprobs"][0]] == want.top_logprobs[1][0].tolist()
    assert main(["generate", "--model", str(model), "--prompt", "a", "--gen-length", "8", "--logprobs", "2"]) == 2
    assert "--logprobs prints with --json" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--chat"], "--suffix infills between a raw prompt and the suffix; --chat ends the prompt"),
    (["--prompt", "b", "--prompt", "c", "--suffix", "y"], "2 --suffix for 3 --prompt"),
])
def test_generate_suffix_misuse_is_one_line(tiny_dirs, capsys, extra, message):
    rc = main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt", "a", "--suffix", "x", "--gen-length", "8",
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_info(tiny_dirs, capsys):
    assert main(["info", "--model", str(tiny_dirs["llada_gqa"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llada" and info["config"]["n_kv_heads"] == 2 and info["parameters"] > 0
    assert info["spec"]["shift_logits"] is False
    assert main(["info", "--model", str(tiny_dirs["dream"])]) == 0
    assert "dream" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--target", "tflite", "--bits", "4"], "unknown export target 'tflite'; targets: onnx"),
    (["--target", "onnx", "--bits", "12"], "target onnx cannot carry 12-bit weights"),
    (["--target", "onnx", "--bits", "3", "--format", "matmulnbits"], "--format matmulnbits stores 2, 4 or 8-bit"),
    (["--target", "gguf", "--bits", "4", "--progressive"], "--progressive scales are an ONNX int8-GEMM grid"),
    (["--target", "onnx", "--scheme", "W4A8", "--progressive"], "progressive group scales need a symmetric grouped"),
    (["--target", "onnx", "--bits", "8", "--progressive"], "progressive group scales need a symmetric grouped grid of "
                                                          "at most 4 bits (got 8-bit, sym, group size 128)"),
    # an option of the other target was dropped without a word (a float ONNX file for --quant Q4_0)
    (["--target", "onnx", "--quant", "Q4_0"], "--quant applies to --target gguf only; --target onnx does not read it"),
    (["--target", "gguf", "--format", "qdq"], "--format applies to --target onnx only"),
    (["--target", "gguf", "--accuracy-level", "4"], "--accuracy-level applies to --target onnx only"),
    (["--target", "gguf", "--embed-head", "int8"], "--embed-head applies to --target onnx only"),
    # a GGUF file whose manifest named the cuda profile, which runs ONNX only
    (["--target", "gguf", "--device", "cuda"], "device profile cuda runs onnx artifacts, not --target gguf"),
    # --scheme auto's options were dropped without a word elsewhere
    (["--target", "onnx", "--bits", "4", "--kquants"], "--kquants goes with --scheme auto"),
    (["--target", "onnx", "--bits", "4", "--avg-bits", "3", "--mix-embed-head"],
     "--avg-bits, --mix-embed-head go with --scheme auto"),
    (["--bits", "4"], "an export needs --target (onnx | gguf)"),
])
def test_bad_export_requests(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dllm-export: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "model folder not found"),
    (["generate", "--model", "{llada}", "--prompt", "x", "--gen-length", "500"], "exceeds the model's context"),
    (["generate", "--model", "{llada}", "--prompt", "x", "--sampler", "nope"], "unknown sampler"),
    (["info", "--model", "{llada}", "--dtype", "float16"], "unrecognized arguments: --dtype float16"),
    (["quantize", "--sym", "--asym", "--out", "x"], "argument --asym: not allowed with argument --sym"),
    (["quantize", "--method", "sparsegpt", "--out", "x"], "argument --method: unknown method 'sparsegpt' (choose "),
    (["quantize", "--scheme", "W5A5", "--out", "x"], "argument --scheme: unknown scheme 'W5A5' (choose from W8A16"),
    (["--target", "onnx", "--device", "pdp11"], "argument --device: invalid choice: 'pdp11' (choose from 'auto', "),
    (["--target", "gguf", "--quant", "Q9_9"], "argument --quant: invalid choice: 'Q9_9' (choose from 'F32', "),
    (["generate", "--model", "{llada}", "--prompt", "x", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["generate", "--model", "{llada}", "--prompt", "x", "--threads", "-1"],
     "argument --threads: must be >= 0, got -1"),
    (["bench", "{llada}", "--reps", "0"], "argument --reps: must be >= 1, got 0"),
    (["bench", "{llada}", "--threads", "1.5"], "argument --threads: expected an integer, got '1.5'"),
    (["serve", "{llada}", "--batch-wait-ms", "-5"], "argument --batch-wait-ms: must be >= 0, got -5.0"),
    (["generate", "--model", "{llada}", "--prompt", "x", "--seed", str(1 << 64)], "seed must lie in [-2**63, 2**64)"),
    (["serve", "{llada}", "--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
    (["serve", "{llada}", "--port", "0", "--max-tokens", "64", "--max-tokens-limit", "32"],
     "the default max_tokens 64 exceeds the max_tokens limit 32"),
    (["serve", "{llada}", "--port", "99999"], "port must lie in 0..65535 (0: a free one), got 99999"),
    (["serve", "{llada}", "--port", "0", "--max-batch", "0"], "max_batch must be >= 1, got 0"),
    (["serve", "{llada}", "--port", "0", "--timeout", "0"], "timeout must be > 0 seconds, got 0.0"),
    (["serve", "{llada}", "--port", "0", "--timeout", "nan"], "timeout must be > 0 seconds, got nan"),
    (["serve", "{llada}", "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    # 100000 threads exhausted the process table: a segfault in torch, a hang in onnxruntime
    (["generate", "--model", "{llada}", "--prompt", "x", "--threads", "100000"], "argument --threads: 100000 threads on"),
    (["generate", "--model", "{llada}", "--prompt", "abc\udcff", "--gen-length", "8"],  # bytes that are not UTF-8
     "the prompt is not valid UTF-8 text"),
    (["analyze", "--model", "{llada}", "--ratios", "abc", "--out", "x"], "--ratios takes mask ratios in [0, 1]"),
    (["analyze", "--model", "{llada}", "--ratios", "nan", "--samples", "1", "--seq-len", "16", "--no-plots",
      "--out", "{tmp}/an"], "mask ratios must be numbers in [0, 1], got nan"),
    (["analyze", "--model", "{llada}", "--out", "{file}"], "output folder {file} is an existing file"),
    (["bench", "{llada}", "--json", "{file}/x.json"], "cannot write {file}/x.json: {file} is a file, not a folder"),
    (["bench", "{llada}", "--canvas", "5000", "--reps", "1", "--decode-reps", "1", "--gen-length", "8",
      "--no-roofline"], "canvas 5000 exceeds the model's context"),
])
def test_errors_are_one_line_with_nonzero_exit(tiny_dirs, capsys, tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    fill = dict(llada=tiny_dirs["llada"], tmp=tmp_path, file=tmp_path / "file")
    args = [a.format(**fill) for a in args]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and message.format(**fill) in err and err.count("\n") == 1, err
    assert not (tmp_path / "an").exists()


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    """The installed entry point returns the error code to the shell."""
    proc = subprocess.run([sys.executable, "-m", "dllm_export.cli", "info", "--model", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "model folder not found" in proc.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`dllm-export info | head -1`: the pipe closes under the writer; it stops quietly (exit 141,
    as a shell reports SIGPIPE) instead of a BrokenPipeError traceback on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "dllm_export.cli", "info", "--model", "default"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first line is written
    err = proc.stderr.read()
    assert proc.wait() == 141 and "Traceback" not in err, err


def test_sym_and_asym_reach_the_config(monkeypatch):
    """--sym / --asym set QuantizeConfig.sym (True / False; neither: None, the method's default)."""
    import dllm_export.verify as verify

    seen = []

    def fake(model, out, qcfg, **kw):
        seen.append(qcfg.sym)
        raise verify.CheckpointError("stop here")

    monkeypatch.setattr(verify, "quantize_verified", fake)
    for flags in (["--sym"], ["--asym"], []):
        assert main(["quantize", *flags, "--out", "x"]) == 2
    assert seen == [True, False, None]


def test_export_subcommand_equals_the_root_form(tiny_dirs, tmp_path, capsys):
    """`dllm-export export ...` and the root `dllm-export --target ...` are one command: same artifact bytes."""
    import hashlib

    digests = []
    for prefix, name in (([], "root"), (["export"], "sub")):
        out = tmp_path / name
        assert main([*prefix, "--target", "onnx", "--model", str(tiny_dirs["llada"]), "--out", str(out)]) == 0
        assert f"{out}: llada -> onnx (qdq), float32" in capsys.readouterr().out
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())})
    assert digests[0] == digests[1] and "model.onnx" in digests[0]


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, capsys):
    """--out under a read-only or pseudo file system died with FileNotFoundError once the export had
    quantized (the temp folder beside it); now one line before any work, and nothing is left."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "w"
        try:  # root writes anywhere: then /proc is the folder no one can make entries in
            probe.mkdir()
            probe.rmdir()
            target = Path("/proc/dllm-export-test/art")
        except OSError:
            target = ro / "sub" / "art"
        if not target.parent.parent.exists():
            pytest.skip("no read-only place to write into here")
        assert main(["--target", "onnx", "--bits", "4", "--method", "rtn", "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dllm-export: error: cannot write the output folder {target}: ") and err.count("\n") == 1
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("code, text, path, rc", [
    ("ENOSPC", "No space left on device", "/data/out/.art.tmp-1/model.onnx.data", 1),  # the machine
    ("EACCES", "Permission denied", "/data/calib.txt", 2),  # a file the user named (outputs are tried first)
])
def test_os_errors_are_one_line(monkeypatch, capsys, code, text, path, rc):
    """A full disk or a file gone mid-run is the machine (exit 1), a file the user may not read is
    their input (exit 2): one line naming the file either way."""
    import errno

    import dllm_export.cli as cli

    def fail(args):
        raise OSError(getattr(errno, code), text, path)  # OSError picks the subclass: PermissionError for EACCES

    monkeypatch.setattr(cli, "cmd_info", fail)
    assert main(["info", "--model", "default"]) == rc
    assert capsys.readouterr().err == f"dllm-export: error: {path}: {text}\n"


def test_other_errors_are_one_line_with_exit_1(monkeypatch, capsys):
    """A library's own error type (safetensors' disk full) or a bug: one line, no traceback."""
    import dllm_export.cli as cli

    def boom(args):
        raise RuntimeError("safetensors: No space left\non device")

    monkeypatch.setattr(cli, "cmd_info", boom)
    assert main(["info", "--model", "default"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dllm-export: error: RuntimeError: safetensors: No space left on device (") and \
        err.count("\n") == 1
    monkeypatch.setenv("DLLM_EXPORT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["info", "--model", "default"])


def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch, capsys):
    """SIGTERM (a scheduler, `timeout`) raises in the command, so every writer's cleanup runs, and the
    exit code is 143; the default handler is back afterwards."""
    import os
    import signal
    import time

    import dllm_export.cli as cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this ends
        return 0

    monkeypatch.setattr(cli, "cmd_info", terminated)
    assert main(["info", "--model", "default"]) == 143
    assert capsys.readouterr().err == "dllm-export: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("manifest,bits", [
    ({"scheme": "W8A16", "quantize_settings": {"bits": 4}}, 4),  # --bits 4 --scheme W8A16
    ({"scheme": "W4A16", "settings": {"bits": 7}}, 7),  # quantize --bits 7
    ({"scheme": "W4A16", "settings": {"bits": 4}}, None),
    ({"scheme": "W4A16", "settings": {"bits": None}}, None),
    ({"scheme": "auto", "settings": {"bits": 4}}, None),
    ({"scheme": None}, None),
])
def test_bits_that_override_the_scheme_are_named(manifest, bits):
    from dllm_export.verify import override_bits

    assert override_bits(manifest) == bits


@pytest.mark.parametrize("args,message", [
    (["eval", "--model", "{llada}", "--tasks", ",,,"], "--tasks names no task (got ',,,')"),
    (["verify", "{llada}/config.json"], "is a file: pass the artifact folder that holds it"),
    (["eval", "--model", "{llada}", "--fidelity", "--reference", "{dream}", "--windows", "2", "--ratios", "0.5",
      "--tasks", "arithmetic", "--items", "1"], "a llada candidate cannot be scored against a dream reference"),
])
def test_more_bad_input_is_one_line(tiny_dirs, capsys, args, message):
    rc = main([a.format(llada=tiny_dirs["llada"], dream=tiny_dirs["dream"]) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args,message", [
    (["--tasks", "arithmetic,bogus"], "unknown task 'bogus'"),  # after arithmetic had run
    (["--json", "{tmp}"], "is a folder, expected a file name"),  # "Is a directory", exit 1, after the tasks
    (["--json", "/proc/x/r.json"], "cannot write /proc/x/r.json"),
    (["--fidelity", "--reference", "{tmp}/missing"], "model folder not found"),
    (["--items", "0"], "items per task must be >= 1"),
])
def test_eval_refuses_before_any_task_runs(tiny_dirs, tmp_path, capsys, monkeypatch, args, message):
    """`eval` checks its tasks, output file and fidelity reference before the first task's minutes
    (found by fuzzing its flags: a bad --json path failed with exit 1 after every task had run)."""
    import dllm_export.eval.tasks as tasks

    monkeypatch.setattr(tasks, "run_task", lambda *a, **k: pytest.fail("a task ran before the input was checked"))
    rc = main(["eval", "--model", str(tiny_dirs["llada"]), *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
