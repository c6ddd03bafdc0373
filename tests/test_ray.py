"""`report --executor ray` on a local Ray cluster started here (two worker CPUs, loopback only):
the same report.csv as the local executor byte for byte, a raising cell reported with its key while
the others complete, a worker killed mid-cell costing only that cell's retry, and a re-run resuming
from the cell cache."""

import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from dllm_export.eval.report import ReportConfig, run_report  # noqa: E402
from dllm_export.executors import RayExecutor  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class Faulty:
    """A Ray executor whose cells note every attempt in `marks`; cell `boom` raises, and the worker
    of cell `kill` waits on its first attempt to be killed (by the test, from outside)."""

    name = "ray"

    def __init__(self, marks, boom, kill):
        self.inner, self.marks, self.boom, self.kill = RayExecutor(max_retries=2), str(marks), boom, kill

    def map(self, fn, cells, on_done=None):
        marks, boom, kill = self.marks, self.boom, self.kill

        def faulty(cell):  # a closure: Ray ships it by value, no import of this test module
            import os
            import time
            from pathlib import Path

            n = len(list(Path(marks).glob(cell.key + ".*")))
            Path(marks, f"{cell.key}.{n}").write_text(str(os.getpid()))
            if cell.key == boom:
                raise RuntimeError(f"injected failure in {cell.key}")
            if cell.key == kill and n == 0:
                time.sleep(120)  # killed here, mid-cell; the retry runs the cell
            return fn(cell)

        return self.inner.map(faulty, cells, on_done)


def _killer(marks, key, stop):
    """Kill the worker running `key` (SIGKILL, as an OOM killer or a lost node would) once it started."""
    f = marks / f"{key}.0"
    while not stop.is_set():
        if f.is_file() and f.read_text():
            time.sleep(0.5)
            os.kill(int(f.read_text()), signal.SIGKILL)
            return
        time.sleep(0.1)


def test_ray_report_equals_local_survives_a_killed_worker_and_resumes(cluster, tiny_dirs, tmp_path):
    cfg = ReportConfig(models=(str(tiny_dirs["llada"]),), methods=("rtn", "gptq"), schemes=("W4A16",),
                       tasks=("arithmetic",), items=3, calib_samples=2, calib_seq_len=32, fidelity_windows=2)
    local = run_report(cfg, tmp_path / "local")
    assert not local["failed"]

    marks = tmp_path / "marks"
    marks.mkdir()
    boom, kill = "llada-gptq-w4a16-uniform", "llada-rtn-w4a16-uniform"
    stop = threading.Event()
    t = threading.Thread(target=_killer, args=(marks, kill, stop), daemon=True)
    t.start()
    try:
        first = run_report(cfg, tmp_path / "ray", executor=Faulty(marks, boom, kill))
    finally:
        stop.set()
        t.join()
    assert first["failed"] == [{"cell": boom, "error": f"RuntimeError: injected failure in {boom}"}]
    by_cell = {r["cell"]: r for r in first["rows"]}
    assert by_cell[boom]["error"].startswith(f"cell {boom} failed")
    assert by_cell[kill]["scores"] == {r["cell"]: r for r in local["rows"]}[kill]["scores"]
    attempts = {k: len(list(marks.glob(f"{k}.*"))) for k in by_cell}
    assert attempts == {"llada-fp": 1, kill: 2, boom: 1}  # the killed cell ran twice, nothing else did

    cells = tmp_path / "ray" / "cells"
    stamps = {k: (cells / k / "results.json").stat().st_mtime_ns for k in ("llada-fp", kill)}
    assert not (cells / boom / "results.json").exists()  # a crash is not cached: the re-run tries it
    again = run_report(cfg, tmp_path / "ray", executor=RayExecutor())
    assert not again["failed"]
    assert {k: (cells / k / "results.json").stat().st_mtime_ns for k in stamps} == stamps  # resumed
    for name in ("report.csv", "report.md"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert json.loads((tmp_path / "ray" / "report.json").read_text())["rows"] == \
        json.loads((tmp_path / "local" / "report.json").read_text())["rows"]
