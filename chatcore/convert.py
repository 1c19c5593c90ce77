"""Write a GGUF model out as a Hugging Face directory (config.json, model.safetensors, tokenizer files).

The tensors are written as dequantized float32, so the directory computes exactly what the GGUF does,
and transformers can load it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from chatcore.checkpoint_config import config_to_hf
from chatcore.errors import ModelFormatError
from chatcore.loader import open_checkpoint
from chatcore.models import FAMILIES


def _umask() -> int:
    """The process umask (read by setting it: for the moment between the calls it is 022 at most, never 0)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def gguf_to_hf_dir(gguf_path: Path, out: str | Path) -> Path:
    if gguf_path.suffix.lower() != ".gguf":
        raise ModelFormatError(f"{gguf_path} is not a .gguf file; only GGUF models are converted")
    cfg, source, tok = open_checkpoint(gguf_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: source.get(name).contiguous() for name in FAMILIES[cfg.family].tensor_names(cfg)}
    weights = out / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.chmod(weights, 0o666 & ~_umask())  # safetensors writes 0600; the other files get the usual mode
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2), encoding="utf-8")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    if tok is not None:
        tok.save(out)
    return out
