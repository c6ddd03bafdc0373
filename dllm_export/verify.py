"""Verified artifacts: `dllm-export verify ARTIFACT`, and writing an artifact that passes it.

Every artifact folder (ONNX, GGUF, quantized checkpoint) carries a manifest listing each of its
files with size and sha256 (`fileio.write_manifest`). An artifact written by the CLI or `build`
also stores reference logits of a fixed canvas, computed by the artifact's own runtime right
after writing, before the folder takes its final name. `verify` then checks, in this order:

1. files: every listed file is present, of its size and sha256, and manifest.json matches its own
   `manifest_sha256` (a flipped byte anywhere is named);
2. format: onnx.checker on the graph, the GGUF header and tensor table (gguf-py), the safetensors
   headers of a quantized checkpoint;
3. load + smoke forward: the runtime loads it (onnxruntime session, llama.cpp model, torch) and
   the fixed canvas gives the stored logits again (to `SMOKE_RTOL` of their magnitude: a
   different CPU may round 8-bit activations differently, a broken runtime gives other logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .fileio import MANIFEST, atomic_folder, check_files, check_manifest_digest, write_manifest
from .formats import GGUF_FORMAT, ONNX_FORMAT, QUANTIZED_FORMAT, check_format_version

CANVAS_LENGTH = 32
N_PROBE = 16
SMOKE_RTOL = 0.02


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` checked: the artifact kind, the number of files hashed, and one line per check."""

    path: Path
    kind: str
    files: int
    checks: list[str] = field(default_factory=list)


def _read_manifest(folder: Path) -> dict:
    import json

    f = folder / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; not an artifact written by dllm-export")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), str):
        raise CheckpointError(f"{f}: not a dllm-export manifest (no format tag)")
    check_format_version(manifest, f)
    return manifest


def artifact_folder(path: str | Path) -> Path:
    """The artifact folder of `path` (a folder, or the .gguf file inside one)."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        p = p.parent
    if p.is_file():  # model.onnx, manifest.json, ...: the folder holds the artifact
        raise CheckpointError(f"{p} is a file: pass the artifact folder that holds it ({p.parent})")
    if not p.is_dir():
        raise CheckpointError(f"artifact folder not found: {p}")
    return p


def artifact_kind(manifest: dict) -> str:
    """onnx | gguf | quantized, from the manifest's format tag."""
    kind = {ONNX_FORMAT: "onnx", GGUF_FORMAT: "gguf", QUANTIZED_FORMAT: "quantized"}
    if manifest.get("format") not in kind:
        raise CheckpointError(f"unknown artifact format {manifest.get('format')!r} in {MANIFEST}")
    return kind[manifest["format"]]


def artifact_info(path: str | Path) -> dict:
    """What an exported artifact is, from its manifest alone (no weights read): its kind and format,
    family, source checkpoint, PTQ method / scheme / GGUF file type, export and device settings,
    dims, spec ids and files with their sizes."""
    folder = artifact_folder(path)
    m = _read_manifest(folder)
    return {"path": str(folder), "kind": artifact_kind(m), "format": m["format"], "version": m.get("version"),
            "family": m.get("family"), "source": m.get("source"), "method": m.get("method"),
            "scheme": m.get("scheme"), "weight_bits": override_bits(m), "file_type": m.get("file_type"),
            "export": m.get("export"),
            "device": (m.get("device") or {}).get("name"), "dims": m.get("dims"), "spec": m.get("spec"),
            "files": {name: f.get("bytes") for name, f in (m.get("files") or {}).items()}}


def override_bits(manifest: dict) -> int | None:
    """The weight bits a manifest's PTQ settings put in place of its scheme's (`--bits 4 --scheme
    W8A16` quantizes to 4 bits), else None: the scheme's name alone would mislabel the weights."""
    from .quant import get_scheme

    scheme = manifest.get("scheme")
    bits = (manifest.get("quantize_settings") or manifest.get("settings") or {}).get("bits")
    if not scheme or scheme == "auto" or bits is None:
        return None
    return bits if bits != get_scheme(scheme).w_bits else None


def fixed_canvas(mask_id: int, vocab_rows: int, context: int) -> torch.Tensor:
    """The smoke-test input [1, L]: seeded random ids, the second half masked (as a denoising step sees)."""
    L = min(CANVAS_LENGTH, context)
    ids = torch.randint(0, vocab_rows, (1, L), generator=torch.Generator().manual_seed(0))
    ids[0, L // 2:] = mask_id
    return ids


def _summary(logits: torch.Tensor) -> dict:
    """A few numbers per canvas position that any wrong logits change: the logits of N_PROBE
    evenly spaced vocabulary ids, the maximum and the log-sum-exp."""
    x = logits[0].double()
    probe = torch.linspace(0, x.shape[-1] - 1, N_PROBE).round().long()
    r = lambda t: [round(float(v), 5) for v in t.reshape(-1)]  # noqa: E731
    return {"probe_ids": probe.tolist(), "probe": r(x[:, probe]), "max": r(x.max(-1).values),
            "logsumexp": r(torch.logsumexp(x, -1))}


def _forward(folder: Path) -> tuple[dict, str]:
    from .runtime.backends import load_backend

    be = load_backend(folder)
    try:
        ids = fixed_canvas(be.spec.mask_id, be.vocab_size, be.max_length)
        with torch.inference_mode():
            logits = be.forward(ids)
        if not bool(torch.isfinite(logits).all()):
            raise CheckpointError(f"{folder}: the smoke forward gives NaN / Inf logits")
        return {"canvas": ids[0].tolist(), **_summary(logits)}, be.name
    finally:
        if hasattr(be, "close"):
            be.close()


def record_reference(folder: str | Path) -> dict:
    """Run the artifact in `folder` on the fixed canvas with its own runtime and store the result
    as `reference` in its manifest (rewritten with the file list). Returns the manifest."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    ref, backend = _forward(folder)
    manifest["reference"] = {"backend": backend, "rtol": SMOKE_RTOL, **ref}
    return write_manifest(folder, manifest)


def _check_format(folder: Path, kind: str) -> str:
    if kind == "onnx":
        import onnx

        from .exporter.onnx import MODEL_FILE

        try:
            onnx.checker.check_model(str(folder / MODEL_FILE))
        except Exception as e:  # ValidationError, or a protobuf DecodeError for a corrupt file
            raise CheckpointError(f"{folder / MODEL_FILE}: onnx.checker rejects it ({str(e).strip()[:200]})") from None
        return "onnx.checker: ok"
    if kind == "gguf":
        import gguf

        from .exporter.gguf import MODEL_FILE

        try:
            reader = gguf.GGUFReader(str(folder / MODEL_FILE))
        except Exception as e:  # gguf-py raises ValueError / struct errors on a bad header or table
            raise CheckpointError(f"{folder / MODEL_FILE}: not a readable GGUF ({type(e).__name__}: {e})") from None
        return f"gguf header: {len(reader.tensors)} tensors, {len(reader.fields)} keys"
    from .models.checkpoint import open_shards

    return f"safetensors headers: {len(open_shards(folder))} tensors"


def _compare(folder: Path, ref: dict, got: dict) -> str:
    if ref.get("canvas") != got["canvas"]:
        raise CheckpointError(f"{folder / MANIFEST}: the stored reference canvas is not this version's fixed canvas")
    worst = 0.0
    for key in ("probe", "max", "logsumexp"):
        try:
            a, b = np.asarray(ref.get(key, []), np.float64), np.asarray(got[key], np.float64)
        except (TypeError, ValueError):  # not a list of numbers
            a, b = None, None
        if a is None or a.shape != b.shape:
            raise CheckpointError(f"{folder / MANIFEST}: malformed reference logits ({key})")
        scale = max(1.0, float(np.abs(a).max(initial=0.0)))
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)) / scale)
    rtol = ref.get("rtol", SMOKE_RTOL)
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool):
        raise CheckpointError(f"{folder / MANIFEST}: malformed reference rtol {rtol!r}")
    if not worst <= rtol:
        raise CheckpointError(f"{folder}: the smoke forward differs from the stored reference logits by {worst:.3g} "
                              f"of their magnitude (> {rtol}): the runtime or the weights "
                              f"are not what was exported")
    return f"smoke forward: within {worst:.2g} of the reference logits"


def verify(path: str | Path, smoke: bool = True) -> VerifyResult:
    """Check an artifact: file sizes and hashes, the format checker, a load and a smoke forward
    against the stored reference logits. Raises CheckpointError naming the first bad file."""
    folder = artifact_folder(path)
    manifest = _read_manifest(folder)
    if "files" in manifest:
        check_manifest_digest(folder)
    kind = artifact_kind(manifest)
    n = check_files(folder, manifest, hashes=True)
    if n == 0:
        raise CheckpointError(f"{folder / MANIFEST}: no file list (written by an older dllm-export); re-export it "
                              f"to verify it")
    checks = [f"files: {n} present, sizes and sha256 match"]
    checks.append(_check_format(folder, kind))
    if smoke:
        got, backend = _forward(folder)
        checks.append(f"loads on {backend}")
        ref = manifest.get("reference")
        checks.append(_compare(folder, ref, got) if isinstance(ref, dict) else
                      "smoke forward: finite logits (no reference stored: exported without verification)")
    if kind == "gguf" and isinstance(manifest.get("tokenizer_parity"), dict):
        checks.append(f"tokenizer parity at export: {manifest['tokenizer_parity'].get('summary', 'ok')}")
    return VerifyResult(folder, kind, n, checks)


def seal(folder: str | Path) -> VerifyResult:
    """Store the reference logits of a freshly written artifact and verify it (see module doc)."""
    record_reference(folder)
    return verify(folder)


def export_verified(model, out: str | Path, **kwargs):
    """`exporter.export` into a staging folder, then `seal`: the artifact appears under `out` only
    when it is complete and verified. Returns the ExportResult (path `out`) and the VerifyResult."""
    import dataclasses
    import json

    from .exporter import export

    out = Path(out)
    with atomic_folder(out) as stage:
        res = export(model, stage, **kwargs)
        check = seal(stage)
    manifest = json.loads((out / MANIFEST).read_text())
    return dataclasses.replace(res, path=out, manifest=manifest), dataclasses.replace(check, path=out)


def quantize_verified(model, out: str | Path, qcfg, **kwargs):
    """`quant.quantize` into a staging folder, then `seal` (see `export_verified`). Returns the
    output folder and the VerifyResult."""
    import dataclasses

    from .quant import quantize

    out = Path(out)
    with atomic_folder(out) as stage:
        quantize(model, stage, qcfg, **kwargs)
        check = seal(stage)
    return out, dataclasses.replace(check, path=out)


__all__ = ["VerifyResult", "export_verified", "quantize_verified", "record_reference", "seal", "verify"]
