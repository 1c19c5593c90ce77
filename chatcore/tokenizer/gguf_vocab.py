"""A Hugging Face ``tokenizers`` tokenizer rebuilt from GGUF metadata, so one ``.gguf`` file is enough.

llama.cpp keeps the tokenizer as metadata under ``tokenizer.ggml.*``: the token strings and their types,
the BPE merges (``gpt2`` model) or the SentencePiece scores (``llama`` model), the special token ids, and
the name of the pre-tokenizer (``tokenizer.ggml.pre``). This module writes the equivalent
``tokenizer.json`` and ``tokenizer_config.json`` contents. What each setting means follows llama.cpp
(``src/llama-vocab.cpp``), so a GGUF tokenizes here as it does there; how it maps onto ``tokenizers``
follows transformers' GGUF converter.

    meta = read_gguf_metadata("model.gguf")
    tok = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(meta)))
    config = tokenizer_config_from_gguf(meta)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from gguf import GGUFReader

from chatcore.weights.gguf_reader import GGUFFile

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_MODELS",
    "metadata_from_reader",
    "read_gguf_metadata",
    "supported_pre_tokenizers",
    "tokenizer_config_from_gguf",
    "tokenizer_json_from_gguf",
]

SUPPORTED_MODELS = ("gpt2", "llama")

# llama.cpp's token types (``tokenizer.ggml.token_type``; gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the model states none
SPIECE_UNDERLINE = "\u2581"


# --- reading -----------------------------------------------------------------------------------------


def metadata_from_reader(reader: GGUFFile | GGUFReader) -> dict[str, Any]:
    """Every key/value of an open GGUF file (:class:`GGUFFile` or ``gguf.GGUFReader``) as plain Python values
    (str, int, float, bool, lists)."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    # ``GGUF.version`` / ``GGUF.tensor_count`` / ``GGUF.kv_count`` are the reader's header pseudo-fields.
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf_metadata(path: str | os.PathLike[str] | GGUFFile | GGUFReader) -> dict[str, Any]:
    """Every key/value of a GGUF file as plain Python values (str, int, float, bool, lists of those).

    A path is read with :class:`GGUFFile` (tens of milliseconds); an already open file or reader is reused.
    """
    reader = path if isinstance(path, (GGUFFile, GGUFReader)) else GGUFFile(path)
    return metadata_from_reader(reader)


# --- pre-tokenizers (tokenizer.ggml.pre), as llama.cpp's llm_tokenizer_bpe defines them -------------

# The GPT-2 regex. As the last split it is expressed as ``ByteLevel(use_regex=True)``, whose regex it is.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek LLM's cased letters (Lu/Ll/Lt runs, as written in its tokenizer.json and in llama.cpp).
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376-\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183-\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2-\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_BLOOM = r" ?[^(\s|.,!?" + "\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c" + r")]+"


class _Pre(NamedTuple):
    splits: tuple[str, ...]  # regexes applied one after another, each splitting the previous pieces
    ignore_merges: bool = False  # a piece that is a whole token is taken as is (Llama 3, Tekken)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_PRE_FAMILIES: tuple[tuple[tuple[str, ...], _Pre], ...] = (
    (("default",), _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "jina-v1-en",
      "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe", "trillion", "granite-docling", "exaone4",
      "a.x-4.0", "mellum", "modern-bert"), _Pre((_GPT2,))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "jina-v5-nano"), _Pre((_LLAMA3,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), _Pre((_LLAMA3,))),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     _Pre((r"\p{N}", _GPT2))),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
     _Pre((_QWEN2,))),
    (("qwen35",), _Pre((_QWEN35,))),
    (("falcon",), _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
    (("deepseek-llm",), _Pre((
        "[\r\n]",
        r"\s?[" + _DEEPSEEK_LETTERS + "]+",
        r"\s?[!-/:-~" + "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002" + "]+",
        r"\s+$",
        _DEEPSEEK_CJK,
        r"\p{N}+",
    ))),
    (("deepseek-coder",), _Pre(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"))),
    (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _Pre((
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ))),
    (("tekken",), _Pre((_TEKKEN,), ignore_merges=True, add_bos=True)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _Pre((_GPT4O,))),
    (("bloom", "poro-chat", "gpt3-finnish"), _Pre((_BLOOM,))),
    (("viking",), _Pre((_BLOOM, r"\p{N}"))),
)
_PRE_TOKENIZERS: dict[str, _Pre] = {name: pre for names, pre in _PRE_FAMILIES for name in names}


def supported_pre_tokenizers() -> tuple[str, ...]:
    """The ``tokenizer.ggml.pre`` values this module knows (others fall back to the GPT-2 regex)."""
    return tuple(sorted(_PRE_TOKENIZERS))


def _pre_settings(meta: Mapping[str, Any]) -> _Pre:
    name = meta.get("tokenizer.ggml.pre")
    if name is None:
        logger.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
        return _PRE_TOKENIZERS["default"]
    pre = _PRE_TOKENIZERS.get(str(name))
    if pre is None:
        logger.warning("unknown GGUF pre-tokenizer %r; falling back to the GPT-2 regex (text may tokenize "
                       "differently from llama.cpp)", name)
        return _PRE_TOKENIZERS["gpt2"]
    return pre


def _byte_level_pre_tokenizer(splits: Sequence[str]) -> dict[str, Any]:
    use_regex = splits[-1] == _GPT2
    steps: list[dict[str, Any]] = [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        for regex in (splits[:-1] if use_regex else splits)
    ]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex})
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


# --- shared pieces -----------------------------------------------------------------------------------


def _tokens(meta: Mapping[str, Any]) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF has no tokenizer.ggml.tokens; it carries no tokenizer")
    if "" in tokens:  # llama.cpp renames empty tokens the same way
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    return list(tokens)


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    if len(vocab) != len(tokens):  # llama.cpp refuses such files; keep the first id of each string
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        logger.warning("GGUF vocabulary repeats %d token strings; the later ids are unreachable",
                       len(tokens) - len(vocab))
    return vocab


def _token_id(meta: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_tokens:
        logger.warning("GGUF tokenizer.ggml.%s = %d is outside the vocabulary; ignored", key, value)
        return None
    return value


_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def _added_tokens(meta: Mapping[str, Any], tokens: Sequence[str]) -> list[dict[str, Any]]:
    """CONTROL and UNKNOWN tokens (and the bos/eos/unk/pad ids) as special added tokens, USER_DEFINED
    ones as plain added tokens: llama.cpp matches all of these whole in the text."""
    types = meta.get("tokenizer.ggml.token_type") or ()
    special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
    special.update(i for key in _SPECIAL_IDS.values() if (i := _token_id(meta, key, len(tokens))) is not None)
    user = {i for i, t in enumerate(types) if t == USER_DEFINED} - special
    return [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": i in special}
        for i in sorted(special | user)
    ]


def _add_bos_eos(meta: Mapping[str, Any]) -> tuple[bool, bool]:
    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        default_bos = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    else:
        pre = _PRE_TOKENIZERS.get(str(meta.get("tokenizer.ggml.pre")))
        default_bos = bool(pre and pre.add_bos)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    add_eos = meta.get("tokenizer.ggml.add_eos_token")
    return (default_bos if add_bos is None else bool(add_bos)), bool(add_eos)


def _template_processor(meta: Mapping[str, Any], tokens: Sequence[str]) -> dict[str, Any] | None:
    """BOS / EOS around each sequence, as transformers' Llama tokenizer does, when the file asks for them."""
    add_bos, add_eos = _add_bos_eos(meta)
    n = len(tokens)
    bos, eos = _token_id(meta, "bos_token_id", n), _token_id(meta, "eos_token_id", n)
    if add_bos and bos is None:
        logger.warning("GGUF asks for a BOS token but names none; no BOS is added")
    if add_eos and eos is None:
        logger.warning("GGUF asks for an EOS token but names none; no EOS is added")
    pre = [bos] if add_bos and bos is not None else []
    post = [eos] if add_eos and eos is not None else []
    if not pre and not post:
        return None

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return ([{"SpecialToken": {"id": tokens[i], "type_id": type_id}} for i in pre]
                + [{"Sequence": {"id": name, "type_id": type_id}}]
                + [{"SpecialToken": {"id": tokens[i], "type_id": type_id}} for i in post])

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in pre + post},
    }


def _bpe_model(vocab: dict[str, int], merges: list[list[str]], *, unk_token: str | None = None,
               byte_fallback: bool = False, ignore_merges: bool = False) -> dict[str, Any]:
    return {
        "type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
    }


def _parse_merges(merges: Sequence[str], vocab: Mapping[str, int]) -> list[list[str]]:
    """``"a b"`` strings as ``[a, b]`` pairs; split at the first space after the first character, as
    llama.cpp does. Merges that name tokens outside the vocabulary (which ``tokenizers`` refuses) are dropped."""
    pairs = [merge.split(" ", 1) for merge in merges]  # comprehensions of C calls: ~2x faster than a loop
    for i, pair in enumerate(pairs):
        if not pair[0]:  # the merge starts with a space: split at the next one
            merge = merges[i]
            cut = merge.find(" ", 1)
            pairs[i] = [merge[:cut], merge[cut + 1:]] if cut > 0 else [merge]
    kept = [p for p in pairs if len(p) == 2 and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    if len(kept) < len(pairs):
        logger.warning("dropped %d GGUF merges that do not join two tokens into a third", len(pairs) - len(kept))
    return kept


# --- gpt2: byte-level BPE ----------------------------------------------------------------------------


def _byte_level_tokenizer(meta: Mapping[str, Any], tokens: list[str]) -> dict[str, Any]:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    pre = _pre_settings(meta)
    vocab = _vocab(tokens)
    processors: list[dict[str, Any]] = [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}]
    template = _template_processor(meta, tokens)
    if template is not None:
        processors.append(template)
    return {
        "normalizer": None,
        "pre_tokenizer": _byte_level_pre_tokenizer(pre.splits),
        "post_processor": processors[0] if len(processors) == 1 else {"type": "Sequence",
                                                                      "processors": processors},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": _bpe_model(vocab, _parse_merges(merges, vocab), ignore_merges=pre.ignore_merges),
    }


# --- llama: SentencePiece BPE ------------------------------------------------------------------------


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]) -> list[list[str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, the
    best-scored result first (ties: longer left part, then longer right part), as transformers derives them."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores[: len(tokens)], strict=True):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in pairs)
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)  # stable: ties keep vocabulary order
    return [[left, right] for _, _, _, left, right in ranked]


def _sentencepiece_tokenizer(meta: Mapping[str, Any], tokens: list[str]) -> dict[str, Any]:
    vocab = _vocab(tokens)
    if "tokenizer.ggml.merges" in meta:
        merges = _parse_merges(meta["tokenizer.ggml.merges"], vocab)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) < len(tokens):
            logger.warning("GGUF SentencePiece vocabulary has no scores; ranking merges by token order")
            scores = [-float(i) for i in range(len(tokens))]
        merges = _merges_from_scores(tokens, scores, vocab)
    unk = _token_id(meta, "unknown_token_id", len(tokens))
    unk_token = tokens[unk] if unk is not None else ("<unk>" if "<unk>" in vocab else None)
    if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
        logger.warning("GGUF asks to collapse repeated whitespace (remove_extra_whitespaces); not supported")
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer (not Metaspace) so that, as in llama.cpp, the space prefix also follows each special token.
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}
    normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}, replace]}
                  if space_prefix else replace)
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": _template_processor(meta, tokens),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe_model(vocab, merges, unk_token=unk_token, byte_fallback=True),
    }


# --- public ------------------------------------------------------------------------------------------


def tokenizer_json_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The full ``tokenizer.json`` content for a GGUF's tokenizer (for ``json.dumps`` /
    ``tokenizers.Tokenizer.from_str``)."""
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}")
    tokens = _tokens(meta)
    build = _byte_level_tokenizer if model == "gpt2" else _sentencepiece_tokenizer
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": _added_tokens(meta, tokens), **build(meta, tokens)}


def tokenizer_config_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` content: special token strings, BOS/EOS flags, the chat template and
    the context length."""
    tokens = _tokens(meta)
    config: dict[str, Any] = {}
    for name, key in _SPECIAL_IDS.items():
        i = _token_id(meta, key, len(tokens))
        config[name] = tokens[i] if i is not None else None
    config["add_bos_token"], config["add_eos_token"] = _add_bos_eos(meta)
    config["chat_template"] = meta.get("tokenizer.chat_template")
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    config["model_max_length"] = int(context) if context else VERY_LARGE_INTEGER
    config["clean_up_tokenization_spaces"] = False
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config
