"""Stop strings over streamed text, found even when split across many tokens.

An Aho-Corasick automaton over the stop strings is stepped once per new character. Its state is
exactly the longest suffix of the text so far that is a prefix of some stop string, which is the
text that must be held back (it might become a stop string). So a feed costs O(new text + the
longest stop string), however long the generation has been.

When stop strings overlap, the one that is completed first in the stream wins (ties: the longest,
i.e. the earliest start). That is what a streaming reader can act on, and it makes the result
independent of how the text was split into feeds. It differs from "the leftmost occurrence" only
when one stop string contains another one in its middle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopStrings:
    """Feed generated text in; get back the text that is safe to show, and whether to stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops: tuple[str, ...] = stops
        self.matched: str | None = None  # the stop string that ended the text, once stopped
        self._goto: list[dict[str, int]] = [{}]  # trie edges per node; node 0 is the root
        self._depth: list[int] = [0]  # length of the prefix a node stands for
        self._fail: list[int] = [0]  # longest proper suffix that is also a trie node
        self._hit: list[int] = [0]  # length of the longest stop string ending at this node, or 0
        for s in stops:
            self._insert(s)
        self._link()
        self._node = 0
        self._held = ""  # == the prefix that self._node stands for
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Consume new text; return (text safe to show now, stopped?).

        On a match, the text before the stop string is returned with True and everything from
        the stop string on is discarded; later feeds return ("", True).
        """
        if self._stopped:
            return "", True
        if not self.stops:
            return text, False
        goto, fail, hit = self._goto, self._fail, self._hit
        node = self._node
        for i, ch in enumerate(text):
            while True:
                nxt = goto[node].get(ch)
                if nxt is not None:
                    node = nxt
                    break
                if node == 0:
                    break
                node = fail[node]
            if hit[node]:
                pending = self._held + text[: i + 1]
                start = len(pending) - hit[node]
                self.matched = pending[start:]
                self._stopped, self._held, self._node = True, "", 0
                return pending[:start], True
        pending = self._held + text
        cut = len(pending) - self._depth[node]
        self._held, self._node = pending[cut:], node
        return pending[:cut], False

    def flush(self) -> str:
        """At the end of generation (no stop hit): the text still held back."""
        held, self._held, self._node = self._held, "", 0
        return held

    # -- automaton construction --------------------------------------------------------------

    def _insert(self, s: str) -> None:
        node = 0
        for ch in s:
            nxt = self._goto[node].get(ch)
            if nxt is None:
                nxt = len(self._goto)
                self._goto.append({})
                self._depth.append(self._depth[node] + 1)
                self._fail.append(0)
                self._hit.append(0)
                self._goto[node][ch] = nxt
            node = nxt
        self._hit[node] = len(s)

    def _link(self) -> None:
        queue = deque(self._goto[0].values())  # depth-1 nodes fail to the root
        while queue:
            node = queue.popleft()
            for ch, child in self._goto[node].items():
                f = self._fail[node]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                self._fail[child] = self._goto[f].get(ch, 0)
                if not self._hit[child]:
                    self._hit[child] = self._hit[self._fail[child]]
                queue.append(child)
