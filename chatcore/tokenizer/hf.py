"""The ``tokenizers`` backend (``tokenizer.json``), with the model's own chat template.

Text a user typed never becomes a special token: chat prompts are encoded so that special-token
strings are matched only where the template put them, never inside a message's content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTok

from chatcore.errors import ModelFormatError
from chatcore.tokenizer.chat_encode import SpecialSafeChat, pick_template, token_str

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")





class HFTokenizer(SpecialSafeChat):
    def __init__(self, tok: HFTok, config: Mapping[str, Any] | None = None, *,
                 chat_template_source: str | None = None, extra_eos_ids: Sequence[int] = ()) -> None:
        config = dict(config or {})
        # One instance serves plain encoding (special-token strings stay text), decoding and saving: the
        # flag only changes ``encode`` and is not serialized. The instance that matches special-token strings
        # (``allow_special=True``, rare) is a copy made on first use; copying costs ~0.1 s per load otherwise.
        self._tok = tok  # owned: its encode_special_tokens flag is set here
        self._tok.encode_special_tokens = True
        self._with_special: HFTok | None = None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {k: token_str(config.get(k)) for k in _SPECIAL_KEYS}
        self.chat_template = chat_template_source or pick_template(config.get("chat_template"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._id(self.special_tokens["bos_token"])
        eos = [self._id(self.special_tokens["eos_token"]), *extra_eos_ids]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        self._special_ids = {s: tok.token_to_id(s) for s in specials}
        self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
                            if specials else None)

    @classmethod
    def from_dir(cls, directory: Path, extra_eos_ids: Sequence[int] = ()) -> HFTokenizer | None:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``); None if absent."""
        path = directory / "tokenizer.json"
        if not path.exists():
            return None
        try:
            tok = HFTok.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelFormatError(f"{path} cannot be read ({exc}); re-download the model") from None
        config: dict[str, Any] = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"{cfg_path} is not valid JSON ({exc}); re-download the model") from None
        template = None
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.exists():
            template = jinja_path.read_text(encoding="utf-8")
        return cls(tok, config, chat_template_source=template, extra_eos_ids=extra_eos_ids)

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template)."""
        self._tok.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {k: v for k, v in self.special_tokens.items() if v is not None}
        config.update(add_bos_token=self.add_bos, chat_template=self.chat_template,
                      tokenizer_class="PreTrainedTokenizerFast")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                         encoding="utf-8")

    def _special_matching(self) -> HFTok:
        """The tokenizer with special-token strings in text matched as special tokens (built once; two
        threads racing here both build an equal copy, which is harmless)."""
        if self._with_special is None:
            tok = HFTok.from_str(self._tok.to_str())  # encode_special_tokens is not serialized: False again
            tok.encode_special_tokens = False
            self._with_special = tok
        return self._with_special

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- text <-> ids -------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings stay plain text unless ``allow_special``."""
        ids = (self._special_matching() if allow_special else self._tok).encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
