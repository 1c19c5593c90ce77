"""Stop strings over streamed text: every split, overlaps, and a property test."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.stopping import StopStrings


def stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """Feed the pieces; return everything shown (flushed at the end if never stopped)."""
    s = StopStrings(stops)
    shown = []
    for piece in pieces:
        text, stopped = s.feed(piece)
        shown.append(text)
        if stopped:
            assert s.flush() == ""
            return "".join(shown), True
    shown.append(s.flush())
    return "".join(shown), False


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Text before the first stop string to be completed (ties: the earliest start)."""
    best = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0:
            key = (i + len(stop), i)
            best = key if best is None else min(best, key)
    return (text, False) if best is None else (text[: best[1]], True)


def splits(text: str, cuts: int):
    """Every way of cutting `text` into pieces at up to `cuts` positions."""
    for n in range(cuts + 1):
        for points in itertools.combinations(range(1, len(text)), n):
            bounds = (0, *points, len(text))
            yield [text[a:b] for a, b in itertools.pairwise(bounds)]


def test_every_split_of_a_stop_string() -> None:
    text = "Hello there.\nUser: next question"
    for pieces in splits(text, 3):
        assert stream(["\nUser:"], pieces) == ("Hello there.", True), pieces


def test_every_split_into_single_and_multi_char_pieces() -> None:
    text = "ab<|im_end|>cd"
    for mask in range(2 ** (len(text) - 1)):  # all 2^(n-1) ways to split, down to 1 char each
        pieces, start = [], 0
        for i in range(1, len(text)):
            if mask >> (i - 1) & 1:
                pieces.append(text[start:i])
                start = i
        pieces.append(text[start:])
        assert stream(["<|im_end|>"], pieces) == ("ab", True)


def test_held_text_is_released_once_it_cannot_be_a_stop() -> None:
    s = StopStrings(["STOP"])
    assert s.feed("go ST") == ("go ", False)
    assert s.feed("O") == ("", False)
    assert s.feed("o") == ("STOo", False)  # "STOo" is no prefix of "STOP" any more
    assert s.feed("S") == ("", False)
    assert s.flush() == "S"
    assert s.flush() == ""


def test_overlapping_prefix() -> None:
    # "aabc": after "aa" the held part restarts at the second "a"
    for pieces in splits("xaabcy", 5):
        assert stream(["abc"], pieces) == ("xa", True)
    for pieces in splits("ababac!", 6):
        assert stream(["abac"], pieces) == ("ab", True)


def test_multiple_stop_strings_earliest_wins() -> None:
    stops = ["###", "\nUser:", "</s>"]
    for pieces in splits("answer</s> more ###", 3):
        assert stream(stops, pieces) == ("answer", True)
    s = StopStrings(stops)
    assert s.feed("a\nUs") == ("a", False)
    assert s.feed("er: hi ###") == ("", True)
    assert s.matched == "\nUser:" and s.stopped
    assert s.feed("more") == ("", True)


def test_stop_contained_in_another_completes_first() -> None:
    # "bc" is complete before "abcd" could be: the result must not depend on the split
    for pieces in splits("xabcdy", 5):
        assert stream(["abcd", "bc"], pieces) == ("xa", True)
    # both end at the same character: the longer (earlier-starting) one is hidden entirely
    for pieces in splits("xabcy", 4):
        assert stream(["bc", "abc"], pieces) == ("x", True)


def test_no_stop_flush_returns_everything() -> None:
    for pieces in splits("a<|im_en", 4):
        assert stream(["<|im_end|>"], pieces) == ("a<|im_en", False)
    assert stream([], ["any", "thing"]) == ("anything", False)


def test_stop_at_the_very_start_and_unicode() -> None:
    assert stream(["<end>"], ["<e", "nd>tail"]) == ("", True)
    assert stream(["。\n\n"], ["你好", "。", "\n", "\n再见"]) == ("你好", True)
    assert stream(["🛑"], ["ok 🛑"]) == ("ok ", True)


def test_invalid_stops() -> None:
    with pytest.raises(ValueError):
        StopStrings(["ok", ""])
    assert StopStrings("###").stops == ("###",)


def test_cost_does_not_grow_with_history() -> None:
    s = StopStrings(["<|im_end|>", "\nUser:"])
    for _ in range(20000):
        text, stopped = s.feed("token ")
        assert text == "token " and not stopped
    assert s.flush() == ""  # nothing was held back: nothing accumulates between feeds


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    text=st.text(alphabet="abcd", max_size=30),
    data=st.data(),
)
def test_property_any_split_shows_text_up_to_first_stop(stops: list[str], text: str, data) -> None:
    points = data.draw(st.lists(st.integers(0, len(text)), max_size=10).map(sorted))
    bounds = [0, *points, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert stream(stops, pieces) == reference(stops, text)
