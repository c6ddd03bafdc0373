"""Model families: one file per architecture plus the registry that maps `model_type` to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import dream, llada
from .spec import ModelSpec


@dataclass(frozen=True)
class Family:
    """How to build one architecture: its spec, config parser, module class and config-key map."""

    spec: ModelSpec
    parse_config: Callable[[dict], object]
    module: type[nn.Module]
    # config.json keys holding the special ids (spec field -> config key)
    id_keys: dict[str, str]


FAMILIES: dict[str, Family] = {
    "llada": Family(llada.SPEC, llada.LLaDAConfig.from_dict, llada.LLaDAModelLM,
                    {"mask_id": "mask_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}),
    "dream": Family(dream.SPEC, dream.DreamConfig.from_dict, dream.DreamModelLM,
                    {"mask_id": "mask_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id",
                     "bos_id": "bos_token_id"}),
}


def family_for(model_type: str | None) -> Family:
    """The family of a config's `model_type` (case-insensitive: LLaDA writes "llada", Dream "Dream")."""
    from ..errors import CheckpointError

    key = model_type.lower() if isinstance(model_type, str) else ""
    if key not in FAMILIES:
        known = ", ".join(sorted(f.spec.model_type for f in FAMILIES.values()))
        raise CheckpointError(f"unknown model_type {model_type!r} in config.json (supported: {known})")
    return FAMILIES[key]


__all__ = ["FAMILIES", "Family", "ModelSpec", "family_for"]
