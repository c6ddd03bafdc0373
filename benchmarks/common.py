"""What the benchmark scripts share, with no heavy imports (serve_load runs without torch in its own
process): the host's CPU name and the results writer."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_results(res: dict, stem: str | Path, markdown: str) -> list[Path]:
    """Write `res` as STEM.json and `markdown` as STEM.md (folders made on the way); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(res, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths
