"""Incremental detokenization with a real (tiny, trained here) byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatcore.detokenize import MAX_HELD_TOKENS, IncrementalDetokenizer

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Café crème brûlée — naïve façade, déjà vu, São Paulo.",
    "你好，世界！今天天气很好。我们去公园吧。",
    "Emoji time 😀🎉👍🏽 and 🇫🇷 flags, 🤖 robots.",
    "Ünïcödé ßtraße Ωμέγα Привет мир",
    "The quick brown fox jumps over the lazy dog 12345.",
]
TEXT = "Hello Café 😀 你好，世界！ naïve 👍🏽 déjà 🇫🇷 Привет world."
REPLACEMENT = "\ufffd"


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map byte-level BPE uses for its base tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    t.train_from_iterator(CORPUS * 3, trainer)
    return t


@pytest.fixture(scope="module")
def byte_ids(tok) -> dict[int, int]:
    return {b: tok.token_to_id(ch) for b, ch in gpt2_bytes_to_unicode().items()}


def run(decode: Callable[[list[int]], str], ids: list[int], prefix_ids: Sequence[int] = ()) -> list[str]:
    """All pushed chunks, then the flush."""
    det = IncrementalDetokenizer(decode, prefix_ids)
    chunks = [det.push(i) for i in ids]
    chunks.append(det.flush())
    assert det.flush() == ""
    return chunks


def test_a_token_ending_inside_a_character_shows_nothing(tok) -> None:
    """The tokenizer really ends tokens inside characters; at the first such token the detokenizer has shown
    exactly the text of the tokens before it, and that token adds nothing."""
    ids = tok.encode(TEXT).ids
    assert tok.decode(ids) == TEXT
    k = next(k for k in range(len(ids)) if tok.decode(ids[: k + 1]).endswith(REPLACEMENT))
    det = IncrementalDetokenizer(tok.decode)
    assert "".join(det.push(i) for i in ids[:k]) == tok.decode(ids[:k])
    assert det.push(ids[k]) == ""


def test_chunks_are_whole_characters_and_concatenate_to_the_decode(tok) -> None:
    ids = tok.encode(TEXT).ids
    chunks = run(tok.decode, ids)
    assert all(REPLACEMENT not in c for c in chunks)
    assert "".join(chunks) == TEXT
    assert chunks[-1] == ""  # everything was complete: nothing left for flush
    # naive per-token decoding would have shown broken characters
    assert REPLACEMENT in "".join(tok.decode([i]) for i in ids)


def test_multibyte_character_is_held_until_complete(tok, byte_ids) -> None:
    emoji = [byte_ids[b] for b in "😀".encode()]
    det = IncrementalDetokenizer(tok.decode)
    assert [det.push(i) for i in emoji] == ["", "", "", "😀"]
    assert det.push(byte_ids[ord("a")]) == "a"
    assert det.push(byte_ids[0xE4]) == ""
    assert det.push(byte_ids[0xBD]) == ""  # still one byte short
    assert det.flush() == tok.decode([byte_ids[0xE4], byte_ids[0xBD]]) == REPLACEMENT


def test_prefix_ids_are_not_emitted(tok) -> None:
    prompt = tok.encode("Prompt: 你好").ids
    ids = tok.encode(" 😀 world").ids
    assert "".join(run(tok.decode, ids, prompt)) == " 😀 world"


def test_invalid_byte_runs_stay_bounded_and_exact(tok, byte_ids) -> None:
    seen: list[int] = []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return tok.decode(ids)

    raw = [0x80] * 40 + list("😀".encode()) + [0xF0, 0x9F] * 20 + list("é ok".encode())
    ids = [byte_ids[b] for b in raw]
    chunks = run(decode, ids)
    assert "".join(chunks) == tok.decode(ids) == bytes(raw).decode("utf-8", "replace")
    assert max(seen) <= 2 * MAX_HELD_TOKENS + 4  # the window never grows with the length


def test_window_stays_small_on_long_output(tok) -> None:
    seen: list[int] = []

    def decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode(TEXT * 30).ids
    prompt = tok.encode(TEXT * 5).ids
    assert "".join(run(decode, ids, prompt)) == TEXT * 30
    assert max(seen) <= 12


@pytest.mark.parametrize("with_prefix", [True, False])
def test_sentencepiece_style_decoder_that_strips_the_leading_space(tok, with_prefix) -> None:
    def decode(ids: list[int]) -> str:  # SentencePiece drops the space of the first word
        text = tok.decode(ids)
        return text[1:] if text.startswith(" ") else text

    words = " Hello world, naïve 你好 😀 again"
    ids = tok.encode(words).ids
    prompt = tok.encode("User: hi").ids if with_prefix else []
    out = "".join(run(decode, ids, prompt))
    assert out == (words if with_prefix else words[1:])  # == decode(ids) without a prompt
    assert "".join(decode([i]) for i in ids) != out  # naive per-token decoding loses the spaces


def test_decoder_that_adds_a_leading_space(tok) -> None:
    def decode(ids: list[int]) -> str:
        return " " + tok.decode(ids)

    words = "Hello world, déjà 🇫🇷 vu"
    ids = tok.encode(words).ids
    assert "".join(run(decode, ids, tok.encode("Prompt").ids)) == words


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=REPLACEMENT), max_size=40))
def test_property_random_unicode(tok, text: str) -> None:
    ids = tok.encode(text).ids
    chunks = run(tok.decode, ids)
    assert all(REPLACEMENT not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_ids_match_full_decode(tok, byte_ids, data) -> None:
    # arbitrary ids, biased towards lone bytes: invalid UTF-8 included
    high_bytes = [byte_ids[b] for b in range(0x80, 0x100)]
    any_id = st.integers(0, tok.get_vocab_size() - 1)
    mixed = st.lists(st.one_of(st.sampled_from(high_bytes), any_id), max_size=60)
    garbage = st.lists(st.sampled_from(high_bytes), min_size=20, max_size=80)  # long held runs
    ids = data.draw(st.one_of(mixed, garbage))
    assert "".join(run(tok.decode, ids)) == tok.decode(ids)
