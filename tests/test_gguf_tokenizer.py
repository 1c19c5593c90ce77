"""The tokenizer rebuilt from GGUF metadata (chatcore.tokenizer.gguf_vocab).

References: transformers' own GGUF tokenizer conversion (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``)
on the real SmolLM2 GGUF and on a small SentencePiece-type GGUF written here, and a re-statement of llama.cpp's
SentencePiece algorithm (``llm_tokenizer_spm_session``) for the places where the two differ.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from counting import lines_run
from tokenizers import Regex, Tokenizer, pre_tokenizers

from chatcore.tokenizer.gguf_vocab import (
    metadata_from_reader,
    read_gguf_metadata,
    supported_pre_tokenizers,
    tokenizer_config_from_gguf,
    tokenizer_json_from_gguf,
)

CONTROL, USER_DEFINED = 3, 4

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "12345",
    "3.14159, 1,000,000 and 2024-06-01T12:30:00Z",
    "Emoji: 😀🎉👍🏽 and ❤️ and 🇫🇷",
    "中文测试：你好，世界！日本語のテキスト。한국어",
    "Accents: café, naïve, Ångström, São Paulo, déjà vu, Øresund",
    "multiple   spaces\tand\ttabs\n\n\nnewlines  \n",
    "  leading and trailing  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "inline <|im_end|> special and <|endoftext|> tokens",
    "It's we're they'll I'd you've DON'T",
    "",
]
# Numerals outside ASCII right after a space: llama.cpp's `smollm` pre-tokenizer (and SmolLM2's own
# tokenizer.json: Digits(individual_digits) before ByteLevel) split them off; transformers' GGUF conversion
# uses the plain GPT-2 regex there, so these are checked against the original pre-tokenizer instead.
NUMERAL_TEXTS = ["Unicode numbers: ½ ² ٣ ① 12½ x²", " ½", "ten ½½ ¾", "Ⅻ Ⅳ"]


# --- the real SmolLM2-135M-Instruct GGUF (gpt2 model, pre "smollm") ------------------------------------


@pytest.fixture(scope="module")
def smol_reader(demo_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(demo_gguf)  # the slow part of reading metadata (~3 s): done once


@pytest.fixture(scope="module")
def smol_meta(smol_reader: gguf.GGUFReader) -> dict[str, Any]:
    return read_gguf_metadata(smol_reader)


@pytest.fixture(scope="module")
def smol_tok(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(smol_meta)))


@pytest.fixture(scope="module")
def smol_ref(demo_gguf: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name)


@pytest.mark.slow
def test_smollm_ids_match_transformers(smol_tok: Tokenizer, smol_ref: Any) -> None:
    for text in TEXTS:
        assert smol_tok.encode(text).ids == smol_ref.encode(text), text


@pytest.mark.slow
def test_smollm_numerals_split_like_the_original_tokenizer(smol_tok: Tokenizer, smol_ref: Any) -> None:
    original = Tokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in NUMERAL_TEXTS + TEXTS:
        assert smol_tok.encode(text).ids == original.encode(text).ids, text
    # " ½": llama.cpp splits the numeral from the space before it ("Ġ", "Â½"), the GPT-2 regex does not.
    assert smol_tok.encode(" ½").ids == [smol_tok.token_to_id("Ġ"), smol_tok.token_to_id("Â½")]


@pytest.mark.slow
def test_smollm_decode_round_trips(smol_tok: Tokenizer) -> None:
    for text in TEXTS + NUMERAL_TEXTS:
        assert smol_tok.decode(smol_tok.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm_special_tokens_are_single_ids(smol_meta: dict[str, Any], smol_tok: Tokenizer) -> None:
    tokens, types = smol_meta["tokenizer.ggml.tokens"], smol_meta["tokenizer.ggml.token_type"]
    control = [i for i, t in enumerate(types) if t == CONTROL]
    assert len(control) == 17
    for i in control:
        assert smol_tok.encode(tokens[i]).ids == [i]
        assert smol_tok.encode(f"x{tokens[i]}y").ids[1] == i
    start, end = smol_tok.token_to_id("<|im_start|>"), smol_tok.token_to_id("<|im_end|>")
    ids = smol_tok.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert ids[0] == start and ids.count(end) == 1
    added = {t.content: t.special for t in smol_tok.get_added_tokens_decoder().values()}
    assert added == {tokens[i]: True for i in control}
    assert smol_tok.get_vocab_size(with_added_tokens=True) == 49152


@pytest.mark.slow
def test_smollm_config_from_metadata(smol_meta: dict[str, Any], smol_tok: Tokenizer) -> None:
    config = tokenizer_config_from_gguf(smol_meta)
    assert config["eos_token"] == "<|im_end|>"
    assert config["bos_token"] == "<|im_start|>"
    assert config["unk_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"] == smol_meta["tokenizer.chat_template"]
    assert "<|im_start|>" in config["chat_template"]
    assert config["model_max_length"] == 8192
    assert smol_tok.encode("hi").ids == [smol_tok.token_to_id("hi")]  # no BOS: add_bos_token is false


@pytest.mark.slow
def test_smollm_files_load_in_transformers(smol_meta: dict[str, Any], smol_ref: Any, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json_from_gguf(smol_meta)), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_from_gguf(smol_meta)),
                                                    encoding="utf-8")
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.chat_template == smol_meta["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "What is 12345 + 1?"}]
    assert (loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == smol_ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert loaded.encode(TEXTS[11]) == smol_ref.encode(TEXTS[11])


@pytest.mark.slow
def test_read_metadata_plain_values_and_fast(smol_reader: gguf.GGUFReader, smol_meta: dict[str, Any]) -> None:
    assert smol_meta["tokenizer.ggml.model"] == "gpt2" and smol_meta["tokenizer.ggml.pre"] == "smollm"
    assert smol_meta["general.architecture"] == "llama"
    assert type(smol_meta["llama.context_length"]) is int
    assert type(smol_meta["llama.rope.freq_base"]) is float
    assert type(smol_meta["tokenizer.ggml.add_bos_token"]) is bool
    tokens = smol_meta["tokenizer.ggml.tokens"]
    assert type(tokens) is list and len(tokens) == 49152 and type(tokens[0]) is str
    assert len(smol_meta["tokenizer.ggml.merges"]) == 48900
    assert type(smol_meta["tokenizer.ggml.token_type"][0]) is int
    assert not any(k.startswith("GGUF.") for k in smol_meta)
    # contents() only, no per-element Python loop of ours: lines run in chatcore/ scale with the fields
    # (a few dozen), not with the 49,152 tokens and 48,900 merges (counted, not timed)
    again, lines = lines_run(lambda: metadata_from_reader(smol_reader), "chatcore")
    assert again == smol_meta
    assert lines < 10 * len(smol_reader.fields), lines


# --- a small SentencePiece (`llama` model) GGUF -------------------------------------------------------

_CHARS = list("▁abcdeghilmnorstwxyHW,.!?'0123456789")
_PIECES = ["▁t", "he", "▁a", "in", "er", "▁the", "re", "▁w", "or", "ll", "▁h", "▁he", "llo", "▁hello", "ld",
           "▁wor", "▁world", "▁in", "▁there", "on", "▁s", "st", "▁st", "ing", "▁string", "es", "▁test", "▁▁",
           "▁▁▁▁", "str", "ring"]


def write_spm_gguf(path: Path, *, add_bos: bool | None = True, space_prefix: bool = True) -> Path:
    """A Llama-2-style vocabulary: <unk> <s> </s>, <0x00>..<0xFF>, characters, merged pieces (scored by
    merge order), a control token and a user-defined one; one tiny tensor so it is a loadable model."""
    head = [("<unk>", 2, 0.0), ("<s>", CONTROL, 0.0), ("</s>", CONTROL, 0.0)]
    head += [(f"<0x{b:02X}>", 6, 0.0) for b in range(256)]
    head += [(c, 1, -1000.0 - i) for i, c in enumerate(_CHARS)]
    head += [(p, 1, -float(i)) for i, p in enumerate(_PIECES)]
    head += [("<|im_start|>", CONTROL, 0.0), ("<tool>", USER_DEFINED, 0.0)]
    tokens = [t for t, _, _ in head]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([s for _, _, s in head])
    writer.add_token_types([t for _, t, _ in head])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(space_prefix)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_spm(meta: Mapping[str, Any], text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenization, restated: split out special / user-defined tokens; put a space
    before the text at the start and after each such token; then merge the adjacent pair whose joined text is
    the best-scored token (leftmost on ties) until none is left; characters outside the vocabulary as bytes."""
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    ids = {t: i for i, t in enumerate(tokens)}
    fragments: list[str | int] = [text]
    for special in sorted((t for t, ty in zip(tokens, types, strict=True) if ty in (2, 3, 4)), key=len,
                          reverse=True):
        split: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                split.append(fragment)
                continue
            for k, part in enumerate(fragment.split(special)):
                if k:
                    split.append(ids[special])
                if part:
                    split.append(part)
        fragments = split
    out = [meta["tokenizer.ggml.bos_token_id"]] if meta.get("tokenizer.ggml.add_bos_token", True) else []
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    after_special = True
    for fragment in fragments:
        if isinstance(fragment, int):
            out.append(fragment)
            after_special = True
            continue
        symbols = list(((" " if prefix and after_special else "") + fragment).replace(" ", "▁"))
        after_special = False
        while True:
            best: tuple[float, int] | None = None
            for i in range(len(symbols) - 1):
                token = ids.get(symbols[i] + symbols[i + 1])
                if token is not None and (best is None or scores[token] > best[0]):
                    best = (scores[token], i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            out.extend([ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()])
    return out


def _random_texts(count: int, seed: int = 0, specials: bool = True) -> list[str]:
    words = ["hello", "world", "the", "there", "string", "test", "in", "a", "Hello", "héllo", "😀", "中", "st",
             "er", "strings", "retest", "x2", "World!"]
    if specials:
        words += ["<|im_start|>", "<tool>", "<s>", "</s>"]
    seps = [" ", " ", " ", "  ", "", "\n", ", ", "    "]
    rng = random.Random(seed)
    return ["".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 8))) for _ in range(count)]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def spm_meta(spm_path: Path) -> dict[str, Any]:
    return read_gguf_metadata(spm_path)


@pytest.fixture(scope="module")
def spm_tok(spm_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(spm_meta)))


def _ids(tok: Tokenizer, *pieces: str) -> list[int]:
    return [tok.token_to_id(p) for p in pieces]


def test_spm_hand_checked(spm_tok: Tokenizer) -> None:
    assert spm_tok.encode("hello world").ids == _ids(spm_tok, "<s>", "▁hello", "▁world")
    assert spm_tok.encode("the string").ids == _ids(spm_tok, "<s>", "▁the", "▁string")
    # a character outside the vocabulary falls back to its UTF-8 bytes
    assert spm_tok.encode("é").ids == _ids(spm_tok, "<s>", "▁", "<0xC3>", "<0xA9>")
    # as in llama.cpp, the space prefix also follows a special token
    assert spm_tok.encode("<|im_start|>hello").ids == _ids(spm_tok, "<s>", "<|im_start|>", "▁hello")
    # a leading space is kept in front of the prefix ("▁▁hello"), as SentencePiece and llama.cpp do
    assert spm_tok.encode(" hello").ids == _ids(spm_tok, "<s>", "▁", "▁hello")
    assert spm_tok.encode("a<tool>b").ids == _ids(spm_tok, "<s>", "▁a", "<tool>", "▁", "b")
    assert spm_tok.encode("").ids == _ids(spm_tok, "<s>")
    assert spm_tok.encode("hello", add_special_tokens=False).ids == _ids(spm_tok, "▁hello")


def test_spm_matches_llama_cpp_algorithm(spm_meta: dict[str, Any], spm_tok: Tokenizer) -> None:
    texts = ["hello world", " hello  world", "<|im_start|>hello", "a<tool>b", "\n", "",
             "héllo 😀 中", "Hello World", "the string test!", *_random_texts(300)]
    for text in texts:
        assert spm_tok.encode(text).ids == llama_cpp_spm(spm_meta, text), text


def test_spm_matches_transformers(spm_path: Path, spm_meta: dict[str, Any], spm_tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(spm_path.parent), gguf_file=spm_path.name)
    reference = json.loads(ref.backend_tokenizer.to_str())["model"]
    ours = json.loads(spm_tok.to_str())["model"]
    assert ours["merges"] == reference["merges"]
    assert ours["vocab"] == reference["vocab"]
    # transformers adds the space prefix with Metaspace(prepend_scheme="first"): the same as here except
    # after a special token and before text that already starts with a space, where llama.cpp's rule is kept.
    texts = [t for t in _random_texts(300, seed=1, specials=False) if not t.startswith(" ")]
    for text in ["hello world", "héllo 😀 中", "Hello World", "the string test!", "\n", "", *texts]:
        assert spm_tok.encode(text).ids == ref.encode(text), text


def test_spm_decode_round_trips(spm_tok: Tokenizer) -> None:
    for text in ["hello world", " hello  world", "héllo 😀 中\n", "  ", *_random_texts(100, seed=2, specials=False)]:
        assert spm_tok.decode(spm_tok.encode(text).ids) == text


def test_spm_config(spm_meta: dict[str, Any]) -> None:
    config = tokenizer_config_from_gguf(spm_meta)
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<s>", "</s>", "<unk>", None)
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["chat_template"].startswith("{{ bos_token }}")
    assert config["model_max_length"] == 64
    added = {a["content"]: a["special"] for a in tokenizer_json_from_gguf(spm_meta)["added_tokens"]}
    assert added == {"<unk>": True, "<s>": True, "</s>": True, "<|im_start|>": True, "<tool>": False}


def test_spm_without_space_prefix_or_bos(tmp_path: Path) -> None:
    meta = read_gguf_metadata(write_spm_gguf(tmp_path / "plain.gguf", add_bos=False, space_prefix=False))
    data = tokenizer_json_from_gguf(meta)
    assert data["post_processor"] is None
    tok = Tokenizer.from_str(json.dumps(data))
    assert tok.encode("hello world").ids == _ids(tok, "he", "llo", "▁world")
    assert tok.decode(tok.encode(" hello world").ids) == " hello world"
    for text in _random_texts(100, seed=3):
        assert tok.encode(text).ids == llama_cpp_spm(meta, text), text
    assert tokenizer_config_from_gguf(meta)["add_bos_token"] is False


def test_spm_add_bos_defaults_to_true_when_absent(tmp_path: Path) -> None:
    meta = read_gguf_metadata(write_spm_gguf(tmp_path / "old.gguf", add_bos=None))
    assert "tokenizer.ggml.add_bos_token" not in meta
    assert tokenizer_config_from_gguf(meta)["add_bos_token"] is True
    tok = Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(meta)))
    assert tok.encode("hello").ids == _ids(tok, "<s>", "▁hello")


# --- byte-level pre-tokenizers, on a small in-memory gpt2 vocabulary ------------------------------------


def _byte_alphabet() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    spelled = {b: chr(b) for b in keep}
    spelled.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in spelled)})
    return [spelled[b] for b in range(256)]


def gpt2_meta(pre: str | None, **extra: Any) -> dict[str, Any]:
    tokens = ["<|endoftext|>", "<|user|>", *_byte_alphabet(), "Ġt", "he", "Ġthe", "ĠĠ"]
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL, USER_DEFINED] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "Ġ Ġ"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        **extra,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


SAMPLE = ("Hello, World! It's 2024-06-01: 12345 apples & 3.5 ½ pears.\r\n\n  def f(x):\treturn x**2  // "
          "ÀÉÎ naïve ĲǅΣσς Straße 中文 日本語 한국어 😀 I'M YOU'LL  \n")


def _pieces(pre_tokenizer: Any, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def _ours(pre: str | None) -> Any:
    return Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(gpt2_meta(pre)))).pre_tokenizer


def test_every_supported_pre_tokenizer_builds() -> None:
    for name in supported_pre_tokenizers():
        pieces = _pieces(_ours(name), SAMPLE)
        assert "".join(pieces) == "".join(_byte_alphabet()[b] for b in SAMPLE.encode()), name


def test_pre_tokenizers_match_transformers_regexes() -> None:
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    splits: dict[str, str] = mapping.GGUF_PRE_TOKENIZER_SPLITS
    shared = sorted(set(splits) & set(supported_pre_tokenizers()))
    assert {"llama-bpe", "llama3", "qwen2", "tekken", "gpt-4o", "dbrx", "smaug-bpe"} <= set(shared)
    for name in shared:
        reference = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(splits[name]), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        assert _pieces(_ours(name), SAMPLE) == _pieces(reference, SAMPLE), name


def test_named_pre_tokenizers() -> None:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    assert _pieces(_ours("gpt-2"), SAMPLE) == _pieces(gpt2, SAMPLE)
    assert _pieces(_ours("gpt2"), SAMPLE) == _pieces(gpt2, SAMPLE)
    for name in ("smollm", "starcoder", "refact"):
        assert _pieces(_ours(name), SAMPLE) == _pieces(smollm, SAMPLE), name
    assert _pieces(_ours("smollm"), "x 12345") == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert _pieces(_ours("llama-bpe"), "x 12345") == ["x", "Ġ", "123", "45"]
    assert _pieces(_ours("qwen2"), "x 12345") == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert _pieces(_ours("gpt2"), "x 12345") == ["x", "Ġ12345"]
    # deepseek-llm: cased letters, punctuation, trailing space, CJK and number runs are split in turn
    assert _pieces(_ours("deepseek-llm"), "Hello 世界 123!") == ["Hello", "Ġ", "ä¸ĸçķĮ", "Ġ", "123", "!"]
    # llama.cpp's "default" (also used when the key is missing) splits punctuation runs and digit triples
    assert _pieces(_ours("default"), "a+b=1234") == ["a", "+", "b", "=", "123", "4"]


def test_unknown_pre_tokenizer_falls_back_to_gpt2(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatcore.tokenizer.gguf_vocab"):
        data = tokenizer_json_from_gguf(gpt2_meta("no-such-pre"))
    assert "no-such-pre" in caplog.text
    assert data["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                     "use_regex": True}
    with caplog.at_level(logging.WARNING, logger="chatcore.tokenizer.gguf_vocab"):
        tokenizer_json_from_gguf(gpt2_meta(None))
    assert "default" in caplog.text


def test_gpt2_added_tokens_and_bos() -> None:
    tok = Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(gpt2_meta("gpt-2"))))
    assert tok.encode("the<|user|> the<|endoftext|>").ids == _ids(tok, "t", "he", "<|user|>", "Ġthe",
                                                                  "<|endoftext|>")
    assert {t.content: t.special for t in tok.get_added_tokens_decoder().values()} == {
        "<|endoftext|>": True, "<|user|>": False}
    # Llama 3's pre-tokenizer: BOS by default (as llama.cpp), whole-token pieces skip the merges
    data = tokenizer_json_from_gguf(gpt2_meta("llama-bpe"))
    assert data["model"]["ignore_merges"] is True
    assert tokenizer_config_from_gguf(gpt2_meta("llama-bpe"))["add_bos_token"] is True
    assert Tokenizer.from_str(json.dumps(data)).encode(" the").ids == _ids(tok, "<|endoftext|>", "Ġthe")
    off = gpt2_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})
    assert Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(off))).encode(" the").ids == _ids(tok, "Ġthe")
    eos = gpt2_meta("gpt-2", **{"tokenizer.ggml.add_eos_token": True})
    assert Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(eos))).encode(" the").ids == _ids(
        tok, "Ġthe", "<|endoftext|>")
    config = tokenizer_config_from_gguf(gpt2_meta("gpt-2"))
    assert config["chat_template"] is None and config["pad_token"] is None
    assert config["model_max_length"] > 10**20


@pytest.mark.parametrize("model", ["bert", "t5", None])
def test_unsupported_model_raises(model: str | None) -> None:
    meta = gpt2_meta("gpt-2", **{"tokenizer.ggml.model": model})
    with pytest.raises(ValueError, match="supported: gpt2, llama"):
        tokenizer_json_from_gguf(meta)
