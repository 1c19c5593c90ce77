"""A checkpoint's config (``config.json`` or GGUF metadata) -> :class:`~chatcore.config.ModelConfig`, and back
to ``config.json``: the family is looked up in :data:`chatcore.models.FAMILIES`, which parses its own fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatcore.config import ModelConfig
from chatcore.config_gguf import GGUFKeys, common_fields
from chatcore.errors import ModelFormatError, UnsupportedArchitecture
from chatcore.models import FAMILIES, SUPPORTED
from chatcore.models.family import Family, Fields, RefusedVariant

# Hugging Face `architectures` / `model_type` names, and GGUF `general.architecture` names -> the family
_HF_NAMES = {n: f for f in FAMILIES.values() for n in (f.hf_architecture, f.hf_model_type)}
_GGUF_ARCHS = {f.gguf_arch: f for f in FAMILIES.values() if f.gguf_arch is not None}


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """Parse a transformers ``config.json`` dict (``rope_scaling`` or nested ``rope_parameters``)."""
    family = _hf_family(raw)
    try:
        return _build(family, family.config_from_hf(raw))
    except RefusedVariant as exc:
        raise UnsupportedArchitecture(f"{exc}; supported: {SUPPORTED}") from None
    except KeyError as exc:
        raise ModelFormatError(f"config.json lacks the field {exc.args[0]!r}; is it a causal LM config?") from None
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"config.json has a malformed value: {exc}") from None


def config_from_hf_file(path: Path) -> ModelConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path.parent} has no config.json; a model directory needs one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}); re-download the model") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object; re-download the model")
    return config_from_hf(raw)


def config_from_gguf(meta: Mapping[str, Any]) -> ModelConfig:
    """Parse GGUF metadata (plain key/value dict) of any supported ``general.architecture``."""
    arch = str(meta.get("general.architecture"))
    family = _GGUF_ARCHS.get(arch)
    if family is None or family.config_from_gguf is None:
        raise UnsupportedArchitecture(f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
                                      f"{', '.join(_GGUF_ARCHS)} ({SUPPORTED})")
    key = GGUFKeys(meta, arch)
    try:
        common = common_fields(key)
        fields = {**common, **family.config_from_gguf(key, common)}
    except KeyError as exc:
        raise ModelFormatError(f"GGUF metadata lacks {exc.args[0]!r}; the file is incomplete") from None
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"GGUF metadata has a malformed value: {exc}") from None
    return _build(family, fields)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-compatible ``config.json`` dict (used when converting GGUF to safetensors)."""
    family = FAMILIES[cfg.family]
    eos = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]
    return {"architectures": [family.hf_architecture], "model_type": family.hf_model_type,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "torch_dtype": "float32",
            **family.config_to_hf(cfg)}


def _hf_family(raw: Mapping[str, Any]) -> Family:
    names = list(raw.get("architectures") or []) + [raw.get("model_type")]
    for name in names:
        if name in _HF_NAMES:
            return _HF_NAMES[name]
    shown = ", ".join(str(n) for n in names if n) or "none given"
    raise UnsupportedArchitecture(f"architecture {shown} is not supported; supported: {SUPPORTED}")


def _build(family: Family, fields: Fields) -> ModelConfig:
    cfg = ModelConfig(family=family.name, position=family.position, **fields)
    if cfg.hidden_act not in family.activations:
        raise ModelFormatError(f"model config: activation {cfg.hidden_act!r} is not supported for "
                               f"{cfg.family} (supported: {', '.join(family.activations)})")
    return cfg
