"""What the benchmark scripts share, with no heavy imports (serve_load runs without torch in its own
process): the host's CPU name and the results writer."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# the ISA flags that decide which kernels a host runs (int8 dot products, bf16, AMX tiles)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict:
    """The host a figure was measured on: CPU model, the ISA flags it has of `ISA_FLAGS`, CPU count."""
    flags: set[str] = set()
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    return {"cpu": cpu_model(), "flags": [f for f in ISA_FLAGS if f in flags], "cpus": os.cpu_count()}


def save_results(res: dict, stem: str | Path, markdown: str) -> list[Path]:
    """Write `res` as STEM.json and `markdown` as STEM.md (folders made on the way); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(res, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths
