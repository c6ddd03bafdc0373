"""Crash safety: `quantize` and `export` killed outright (SIGKILL) at several points leave the
output either absent or complete and verified, the next run removes the temporary folders the
killed ones left, and Ctrl-C (SIGINT) leaves nothing and exits 130.

The points are found by watching the output's parent folder (no hook in the library): the run is
killed as soon as its temporary folders show the stage named."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dllm_export.models.factory import make_random_checkpoint
from dllm_export.verify import verify

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _cmd(kind: str, src: Path, out: Path) -> list[str]:
    if kind == "quantize":
        return ["quantize", "--model", str(src), "--method", "rtn", "--out", str(out), "--no-progress"]
    return ["--model", str(src), "--target", "gguf", "--bits", "4", "--method", "rtn", "--out", str(out),
            "--no-progress"]


def _entries(parent: Path) -> dict[str, set[str]]:
    """name -> file names inside, for every hidden entry beside the output (temporary folders)."""
    out = {}
    for p in list(parent.iterdir()):
        if p.name.startswith("."):
            try:
                out[p.name] = {f.name for f in p.iterdir()} if p.is_dir() else set()
            except OSError:  # renamed or removed while listed
                pass
    return out


# point -> (the stage it catches, a test over the hidden entries beside the output)
POINTS = {
    "quantizing": lambda e: any(".tmp-" in n and "quantized" in n for n in e),  # export's PTQ work folder
    # the writer's own temporary folder (inside the CLI's staging folder's name), with files in it
    "writing": lambda e: any(n.count(".tmp-") == 2 and "quantized" not in n and files for n, files in e.items()),
    "sealing": lambda e: any(n.count(".tmp-") == 1 and "manifest.json" in files for n, files in e.items()),
}


def _run_until(cmd: list[str], parent: Path, point, sig=signal.SIGKILL, timeout=120.0):
    """Start the CLI, send `sig` once `point` shows in `parent`; returns (rc, stderr, whether it was sent)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT back to its default in the child: a suite started in the background (`cmd &`) hands
    # its children SIGINT ignored, and Python then keeps ignoring it (as a user's Ctrl-C would be)
    p = subprocess.Popen([sys.executable, "-m", "dllm_export.cli", *cmd], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sent, t0 = False, time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < timeout:
        if point is not None and point(_entries(parent)):
            p.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err, sent


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("crash_src") / "llada", family="llada", tokenizer=True,
                                  vocab_size=384, d_model=64, n_heads=4, n_kv_heads=4, max_sequence_length=128)


# each point once across the two commands (every run starts a Python with torch: seconds each)
@pytest.mark.parametrize("kind,points", [("quantize", ["writing"]), ("export", ["quantizing", "sealing"])])
def test_killed_runs_leave_nothing_partial_and_the_next_run_cleans_up(kind, points, src, tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "art"
    for point in points:
        for _ in range(5):  # a stage of a few milliseconds can pass between two looks: run again
            rc, err, sent = _run_until(_cmd(kind, src, out), parent, POINTS[point])
            if sent or rc != 0:
                break
            shutil.rmtree(out)  # finished whole before the point was seen
        assert sent and rc == -signal.SIGKILL, (point, rc, err[-2000:])
        if out.exists():  # killed after the rename: it must be whole
            assert verify(out).files > 0
            return
        assert _entries(parent), f"killed while {point}: nothing left to clean up (the point was missed)"
    rc, err, _ = _run_until(_cmd(kind, src, out), parent, None)
    assert rc == 0, err[-2000:]
    assert [p.name for p in parent.iterdir()] == ["art"], "stale temporary folders of killed runs were left"
    assert verify(out).files > 0


def test_ctrl_c_leaves_nothing_and_exits_130(src, tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    rc, err, sent = _run_until(_cmd("export", src, parent / "art"), parent, POINTS["writing"], sig=signal.SIGINT)
    assert sent and rc == 130, (rc, err[-2000:])
    assert err.strip().splitlines()[-1] == "dllm-export: interrupted" and "Traceback" not in err, err[-2000:]
    assert list(parent.iterdir()) == []
