"""Write a saved transformers checkpoint as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` does, for
tests (import: ``from gguf_convert import write_gguf``).

Restated from the converter, per family: the metadata keys it writes, tensor names from ``gguf``'s own
``TensorNameMap``, Llama's q/k row permutation, BLOOM's q | k | v regrouping of its fused projection and its
duplicated output head, Gemma's norm weights stored as 1 + w, Llama 3's RoPE scaling as a ``rope_freqs``
tensor. The tokenizer is a small GPT-2 byte-level vocabulary of the model's vocab size (so the file is
complete); tests compare logits and token ids, not text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3", "BloomForCausalLM": "bloom", "MptForCausalLM": "mpt",
        "Gemma3ForCausalLM": "gemma3"}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _vocab(size: int) -> tuple[list[str], list[str]]:
    """``size`` tokens: the 256 byte symbols, then merged pairs of letters (their merges in rank order)."""
    tokens, merges = _byte_alphabet(), []
    letters = "etaoinshrdlucmfw"
    for a in letters:
        for b in letters:
            if len(tokens) == size:
                return tokens, merges
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    if len(tokens) < size:
        raise ValueError(f"vocab of {size} is larger than this test vocabulary builds")
    return tokens[:size], merges


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's Llama q/k permutation (half-split rotary pairs -> interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _set_parameters(w: gguf.GGUFWriter, arch: str, hp: dict[str, Any]) -> None:
    if arch == "bloom":
        n_embed, n_head = hp.get("hidden_size", hp.get("n_embed")), hp.get("n_head", hp.get("num_attention_heads"))
        w.add_context_length(hp.get("seq_length", n_embed))
        w.add_embedding_length(n_embed)
        w.add_feed_forward_length(4 * n_embed)
        w.add_block_count(hp["n_layer"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_eps(hp["layer_norm_epsilon"])
        return
    if arch == "mpt":
        attn = hp["attn_config"]
        w.add_context_length(hp["max_seq_len"])
        w.add_embedding_length(hp["d_model"])
        w.add_block_count(hp["n_layers"])
        w.add_feed_forward_length(4 * hp["d_model"])
        w.add_head_count(hp["n_heads"])
        if attn.get("kv_n_heads"):
            w.add_head_count_kv(attn["kv_n_heads"])
        w.add_layer_norm_eps(1e-5)
        if attn.get("clip_qkv") is not None:
            w.add_clamp_kqv(attn["clip_qkv"])
        w.add_max_alibi_bias(attn.get("alibi_bias_max", 8) if attn.get("alibi", True) else 0.0)
        return
    if arch == "gemma3":
        full = (hp.get("rope_parameters") or {}).get("full_attention") or {}
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(hp["hidden_size"])
        w.add_block_count(hp["num_hidden_layers"])
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_head_count(hp["num_attention_heads"])
        w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
        w.add_key_length(hp.get("head_dim", 256))
        w.add_value_length(hp.get("head_dim", 256))
        w.add_rope_freq_base(full.get("rope_theta", 1_000_000.0))
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])
        w.add_head_count_kv(hp.get("num_key_value_heads", 4))
        if full.get("rope_type", "default") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        return
    # the converter's generic text-model parameters (Llama, Qwen2, Qwen3)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    rope = hp.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", hp.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    scaling = hp.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if arch == "llama":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(scaling["factor"])
    elif scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def _tensors(arch: str, hp: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(HF name as the converter sees it, tensor after the converter's reshaping), in file order."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in tensors.items():
        if arch == "bloom":
            name = name.removeprefix("transformer.")
            n_head, n_embed = hp["n_head"], hp["hidden_size"]
            if name.endswith("query_key_value.weight"):
                t = t.reshape(n_head, 3, n_embed // n_head, n_embed).transpose(0, 1).reshape(-1, n_embed)
            elif name.endswith("query_key_value.bias"):
                t = t.reshape(n_head, 3, n_embed // n_head).transpose(0, 1).reshape(-1)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp multiplies by the norm weight, Gemma by 1 + weight
        elif arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hp["num_attention_heads"]
            kv = hp.get("num_key_value_heads") or heads
            t = _permute(t, heads, heads) if "q_proj" in name else _permute(t, heads, kv)
        out.append((name, t))
        if arch == "bloom" and name == "word_embeddings.weight" and "lm_head.weight" not in tensors:
            out.append(("lm_head.weight", t))  # the converter duplicates the tied head into output.weight
    return out


def _llama3_rope_freqs(hp: dict[str, Any]) -> np.ndarray | None:
    """The converter's ``rope_freqs`` for Llama 3 scaling: the divisor of each RoPE frequency."""
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if rope.get("rope_type") != "llama3":
        return None
    base = rope.get("rope_theta", hp.get("rope_theta", 10000.0))
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(hf_dir: Path, out: Path, *, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               chat_template: str | None = None) -> Path:
    """Convert ``hf_dir`` (config.json + model.safetensors) to the GGUF file ``out``. 2-D weights are stored as
    ``qtype`` (F32 keeps them exact); 1-D tensors stay F32, as llama.cpp keeps them."""
    hp = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch = ARCH[hp["architectures"][0]]
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    n_blocks = hp.get("num_hidden_layers") or hp.get("n_layer") or hp.get("n_layers")
    name_map = gguf.get_tensor_name_map(model_arch, n_blocks)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(hf_dir.name)
    _set_parameters(w, arch, hp)
    tokens, merges = _vocab(hp["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    if hp.get("bos_token_id") is not None:
        w.add_bos_token_id(hp["bos_token_id"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if arch == "llama" and (rope_freqs := _llama3_rope_freqs(hp)) is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, t in _tensors(arch, hp, load_file(str(hf_dir / "model.safetensors"))):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {name}"
        data = t.to(torch.float32).numpy()
        if data.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
