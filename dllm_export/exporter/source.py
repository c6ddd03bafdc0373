"""A checkpoint folder opened for export, and the files every artifact folder carries beside its model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileio import write_manifest
from ..models.checks import check_weight
from ..models.checkpoint import is_quantized, open_shards, resolve_model_path, tokenizer_files
from ..models.loader import read_spec


@dataclass
class Source:
    """Config, spec, dims and tensors of a float or quantized checkpoint (`manifest` is the
    quantized checkpoint's manifest, or None), read one tensor at a time."""

    path: Path
    config: dict
    spec: object
    dims: object
    manifest: dict | None
    handles: dict

    @property
    def layers(self) -> dict:
        return self.manifest["layers"] if self.manifest else {}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.handles:
            raise CheckpointError(f"tensor {name} missing from {self.path}")
        t = self.handles[name].get_tensor(name)
        check_weight(name, t, self.path)
        return t

    def linear(self, name: str):
        """Layer `name` as a StoredLinear: its quantized form when the manifest lists it, else float."""
        from ..quant.load import StoredLinear, read_linear

        if name in self.layers:
            return read_linear(self.handles, name, self.layers[name], self.path)
        bias = f"{name}.bias"
        return StoredLinear(name, None, self.tensor(f"{name}.weight"),
                            self.tensor(bias) if bias in self.handles else None, None, None)


def open_source(model_path: str | Path) -> Source:
    """Open a checkpoint folder (or `default` / `default-dream`) for an exporter."""
    from ..quant.load import read_manifest

    path = resolve_model_path(model_path)
    config, spec, dims = read_spec(path)
    manifest = read_manifest(path) if is_quantized(path) else None
    return Source(path, config, spec, dims, manifest, open_shards(path))


def write_sidecars(folder: Path, manifest: dict, src: Source) -> None:
    """config.json and the tokenizer files beside an exported model, then manifest.json listing
    every file of the folder with its size and sha256 (`fileio.write_manifest`)."""
    (folder / "config.json").write_text(json.dumps(src.config, indent=2, sort_keys=True) + "\n")
    for name, content in tokenizer_files(src.path).items():
        (folder / name).write_bytes(content)
    write_manifest(folder, manifest)
