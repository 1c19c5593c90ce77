"""The tiktoken backend: models that ship a tiktoken rank file instead of ``tokenizer.json`` (Llama 3's original
``tokenizer.model``, ``*.tiktoken`` files), encoding exactly as the ``tiktoken`` package does.

Text is split by the model's pre-tokenizer regex (Llama 3's by default, which is cl100k_base's; a file named
after a known encoding gets that encoding's), each piece is looked up whole, else byte-pair merged
(:mod:`chatcore.tokenizer.bpe`, results cached per piece). Special tokens come from the model's
``tokenizer_config.json`` (``added_tokens_decoder``, ``bos_token`` / ``eos_token``, ``chat_template``) and
``special_tokens_map.json``; a special-token string in text stays text unless ``allow_special``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import regex

from chatcore.errors import ModelFormatError
from chatcore.tokenizer.bpe import looks_like_rank_file, merge, read_ranks
from chatcore.tokenizer.chat_encode import SpecialSafeChat, pick_template, token_str

# Pre-tokenizer patterns of the tiktoken encodings (Llama 3 uses cl100k_base's).
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
O200K_PATTERN = "|".join((
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""))
R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = CL100K_PATTERN
PATTERNS = {"cl100k_base": CL100K_PATTERN, "o200k_base": O200K_PATTERN, "r50k_base": R50K_PATTERN,
            "p50k_base": R50K_PATTERN, "p50k_edit": R50K_PATTERN, "gpt2": R50K_PATTERN}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_CACHE_MAX = 200_000     # cached pieces (token ids of pieces that are not a single token)



class TiktokenTokenizer(SpecialSafeChat):
    """Same interface as :class:`chatcore.tokenizer.hf.HFTokenizer`."""

    def __init__(self, ranks: dict[bytes, int], special: Mapping[str, int] | None = None, *,
                 pattern: str = LLAMA3_PATTERN, config: Mapping[str, Any] | None = None,
                 chat_template_source: str | None = None, extra_eos_ids: Sequence[int] = ()) -> None:
        config = dict(config or {})
        self._ranks = ranks
        self._pattern = regex.compile(pattern)
        self._special_ids = dict(special or {})
        self._decoder: dict[int, bytes] = {rank: token for token, rank in ranks.items()}
        self._decoder.update((i, s.encode("utf-8")) for s, i in self._special_ids.items())
        self._special_set = frozenset(self._special_ids.values())
        self._cache: dict[bytes, list[int]] = {}
        self.vocab_size = max(self._decoder) + 1
        self._special_re = (regex.compile("|".join(regex.escape(s) for s in sorted(self._special_ids, key=len,
                                                                                      reverse=True)))
                            if self._special_ids else None)
        self.special_tokens = {k: token_str(config.get(k)) for k in _SPECIAL_KEYS}
        self.chat_template = chat_template_source or pick_template(config.get("chat_template"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token_id = self.token_to_id(self.special_tokens["bos_token"])
        eos = [self.token_to_id(self.special_tokens["eos_token"]), *extra_eos_ids]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos if i is not None))

    @classmethod
    def from_dir(cls, directory: Path, extra_eos_ids: Sequence[int] = ()) -> TiktokenTokenizer | None:
        """The tiktoken tokenizer of a model directory (a ``*.tiktoken`` file, or a ``tokenizer.model`` in
        tiktoken format), with special tokens from its configs; None if it has no such file."""
        path = rank_file(directory)
        if path is None:
            return None
        ranks = read_ranks(path)
        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        special = _special_tokens(config, special_map, ranks)
        config.update({k: special_map[k] for k in _SPECIAL_KEYS if config.get(k) is None and k in special_map})
        template = None
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        pattern = config.get("pat_str") or PATTERNS.get(path.stem, LLAMA3_PATTERN)
        return cls(ranks, special, pattern=pattern, config=config, chat_template_source=template,
                   extra_eos_ids=extra_eos_ids)

    # -- text <-> ids -------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings stay plain text unless ``allow_special``."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: replaced, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        if not allow_special or self._special_re is None:
            self._encode_ordinary(text, ids)
            return ids
        pos = 0
        for m in self._special_re.finditer(text):
            self._encode_ordinary(text[pos : m.start()], ids)
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        self._encode_ordinary(text[pos:], ids)
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        ranks, cache = self._ranks, self._cache
        for piece in self._pattern.findall(text):
            data = piece.encode("utf-8")
            rank = ranks.get(data)
            if rank is not None:
                out.append(rank)
                continue
            ids = cache.get(data)
            if ids is None:
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                ids = cache[data] = merge(data, ranks)
            out.extend(ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 as U+FFFD, as tiktoken; ids past the vocabulary decode to nothing)."""
        get = self._decoder.get
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_set]
        return b"".join(get(i, b"") for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self._special_ids:
            return self._special_ids[token]
        return self._ranks.get(token.encode("utf-8"))


def rank_file(directory: Path) -> Path | None:
    """A directory's tiktoken rank file: one ``*.tiktoken`` file, or ``tokenizer.model`` in tiktoken format."""
    found = sorted(directory.glob("*.tiktoken"))
    if len(found) > 1:
        raise ModelFormatError(f"{directory} has {len(found)} .tiktoken files ({found[0].name}, {found[1].name}); "
                               "keep the model's own one")
    if found:
        return found[0]
    model = directory / "tokenizer.model"
    return model if model.exists() and looks_like_rank_file(model) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}); re-download the model") from None
    return data if isinstance(data, dict) else {}


def _special_tokens(config: Mapping[str, Any], special_map: Mapping[str, Any],
                    ranks: Mapping[bytes, int]) -> dict[str, int]:
    """Special token strings -> ids: ``added_tokens_decoder`` ids as given; any other string named in the
    configs (bos/eos/..., ``additional_special_tokens``) that is not an ordinary token gets the next id after
    the ranks and those."""
    out: dict[str, int] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = token_str(entry)
        if content is not None:
            out[content] = int(key)
    named = [token_str(src.get(k)) for src in (config, special_map) for k in _SPECIAL_KEYS]
    named += [token_str(t) for src in (config, special_map) for t in src.get("additional_special_tokens") or []]
    next_id = max([len(ranks) - 1, *ranks.values(), *out.values()]) + 1
    for content in named:
        if content is not None and content not in out and content.encode("utf-8") not in ranks:
            out[content] = next_id
            next_id += 1
    return out
