"""The registry of model families (families/base.py): each kind of model megamod builds, loads, saves and converts.

    family = families.of_config(cfg)          # by config type
    family = families.get(meta["kind"], ckpt)  # by a checkpoint's metadata
    family = families.of_hf(config, path)      # by an HF config.json's model_type
"""
from __future__ import annotations

from megamod.families.base import ModelFamily
from megamod.families.language import LANGUAGE
from megamod.families.llava import LLAVA

FAMILIES: dict[str, ModelFamily] = {f.kind: f for f in (LANGUAGE, LLAVA)}


def get(kind, where: str = "") -> ModelFamily:
    """The family a checkpoint's `kind` names; `where` (the checkpoint) goes into the error."""
    family = FAMILIES.get(kind)
    if family is None:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}model kind {kind!r} is not one megamod knows ({', '.join(sorted(FAMILIES))})")
    return family


def of_config(cfg) -> ModelFamily:
    for family in FAMILIES.values():
        if type(cfg) is family.config_type:
            return family
    raise TypeError(f"no model family has config type {type(cfg).__name__}")


def of_hf(config: dict, where: str) -> ModelFamily:
    """The family that converts an HF config.json of this model_type."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    arch = (config.get("architectures") or [None])[0]
    known = ", ".join(f"{a} ({t!r})" for f in FAMILIES.values() for t, a in zip(f.hf_model_types, f.hf_architectures))
    raise ValueError(f"{where}: unsupported architecture {arch!r} (model_type {model_type!r}); supported: {known}")
