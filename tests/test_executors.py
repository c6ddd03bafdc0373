"""The executor seam of `report` and `build`: cells with stable keys, seeded from them, results in
grid order, a raising cell reported with its key; Ray only when asked."""

import sys

import pytest
import torch

from dllm_export.errors import InputError
from dllm_export.executors import Cell, LocalExecutor, get_executor, seed_for


def _draw(cell):
    if cell.args.get("boom"):
        raise ValueError("bad cell\nsecond line")
    return torch.rand(3).tolist()


def test_local_executor_seeds_from_the_key_and_reports_a_raising_cell():
    cells = [Cell("a"), Cell("b", {"boom": True}), Cell("c")]
    seen = []
    res = LocalExecutor().map(_draw, cells, on_done=seen.append)
    assert [r.key for r in res] == ["a", "b", "c"] == [r.key for r in seen]
    assert res[1].value is None and res[1].error == "ValueError: bad cell"
    alone = LocalExecutor().map(_draw, [Cell("c")])  # same key, any position or order: same draws
    assert alone[0].value == res[2].value != res[0].value
    assert seed_for("a") == seed_for("a") != seed_for("b")


def test_get_executor_errors(monkeypatch):
    assert get_executor("local").name == "local"
    with pytest.raises(InputError, match="unknown executor 'dask'"):
        get_executor("dask")
    with pytest.raises(InputError, match="apply to --executor ray"):
        get_executor("local", resources='{"num_gpus": 1}')
    with pytest.raises(InputError, match="not valid JSON"):
        get_executor("ray", resources="{num_gpus: 1}")
    with pytest.raises(InputError, match="unknown --cell-resources key"):
        get_executor("ray", resources={"gpus": 1})
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(InputError, match=r"pip install 'dllm-export\[ray\]'"):
        get_executor("ray")


def test_cli_names_the_missing_extra(monkeypatch, tmp_path, capsys):
    from dllm_export.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["report", "--models", "default", "--methods", "rtn", "--schemes", "W8A16", "--tasks", "arithmetic",
                 "--items", "1", "--out", str(tmp_path), "--executor", "ray"]) == 2
    assert "dllm-export[ray]" in capsys.readouterr().err


def test_ray_addresses_nothing_answers_at_are_refused_at_once():
    """Ray retries an address nothing listens at without end (a warning every 30 s); the probe
    names it in one line first. None / auto are this node's, which Ray finds itself."""
    import socket

    from dllm_export.executors import _probe

    for address in (None, "auto"):
        _probe(address)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _probe(f"127.0.0.1:{port}")
        _probe(f"ray://127.0.0.1:{port}")
    with pytest.raises(InputError, match=f"cannot reach a Ray cluster at '127.0.0.1:{port}'"):
        _probe(f"127.0.0.1:{port}")  # closed now
    with pytest.raises(InputError, match="expected host:port, ray://host:port or auto"):
        _probe("nonsense")
