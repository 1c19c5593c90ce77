"""Property test: any sequence of append / edit / regenerate / delete / switch-branch operations
leaves a session whose branch structure equals a plain in-memory model of the same operations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from storage import Store

pytestmark = pytest.mark.redis

texts = st.text(max_size=12)
picks = st.integers(min_value=0, max_value=10_000)


class Model:
    """The spec, written independently of storage: a dict of id -> (parent, role, content)."""

    def __init__(self) -> None:
        self.msgs: dict[str, tuple[str | None, str, str]] = {}
        self.tip: str | None = None

    def add(self, mid: str, parent: str | None, role: str, content: str) -> None:
        if role == "user" and parent is not None and self.msgs[parent][1] == "user":
            parent = self.msgs[parent][0]  # a user message never goes under another: a sibling instead
        self.msgs[mid] = (parent, role, content)
        self.tip = mid

    def children(self, parent: str | None) -> list[str]:
        return [m for m, (p, _, _) in self.msgs.items() if p == parent]

    def newest_leaf(self, start: str | None) -> str | None:
        while self.children(start):
            start = self.children(start)[-1]
        return start

    def delete(self, mid: str) -> None:
        doomed, frontier = {mid}, [mid]
        while frontier:
            kids = self.children(frontier.pop())
            doomed.update(kids)
            frontier += kids
        parent = self.msgs[mid][0]
        for d in doomed:
            del self.msgs[d]
        if self.tip is None or self.tip in doomed:
            self.tip = self.newest_leaf(parent)

    def path(self) -> list[str]:
        out, node = [], self.tip
        while node is not None:
            out.append(node)
            node = self.msgs[node][0]
        return out[::-1]


def make_machine(store: Store) -> type[RuleBasedStateMachine]:
    class Branches(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.sid = store.create_session().id
            self.model = Model()

        def pick(self, i: int, role: str | None = None) -> str | None:
            ids = [m for m, (_, r, _) in self.model.msgs.items() if role is None or r == role]
            return ids[i % len(ids)] if ids else None

        @rule(role=st.sampled_from(["user", "assistant", "tool", "system"]), content=texts)
        def append(self, role: str, content: str) -> None:
            m = store.append_message(self.sid, role, content)
            self.model.add(m.id, self.model.tip, role, content)

        @precondition(lambda self: self.model.msgs)
        @rule(i=picks, content=texts)
        def edit(self, i: int, content: str) -> None:
            target = self.pick(i)
            m = store.edit_message(self.sid, target, content)
            self.model.add(m.id, self.model.msgs[target][0], self.model.msgs[target][1], content)

        @precondition(lambda self: any(r == "assistant" for _, r, _ in self.model.msgs.values()))
        @rule(i=picks, content=texts)
        def regenerate(self, i: int, content: str) -> None:
            target = self.pick(i, "assistant")
            with store.regenerate(self.sid, target) as w:
                w.write(content)
            self.model.add(w.id, self.model.msgs[target][0], "assistant", content)

        @precondition(lambda self: self.model.msgs)
        @rule(i=picks)
        def delete(self, i: int) -> None:
            target = self.pick(i)
            store.delete_message(self.sid, target)
            self.model.delete(target)

        @precondition(lambda self: self.model.msgs)
        @rule(i=picks)
        def switch_branch(self, i: int) -> None:
            target = self.pick(i)
            store.switch_branch(self.sid, target)
            self.model.tip = self.model.newest_leaf(target)

        @invariant()
        def same_structure(self) -> None:
            conv = store.load(self.sid)
            assert [(m.id, m.parent_id, m.role, m.content) for m in conv.messages] == [
                (mid, p, r, c) for mid, (p, r, c) in self.model.msgs.items()]
            assert conv.session.tip_id == self.model.tip
            assert [m.id for m in conv.thread()] == self.model.path()
            assert conv.session.message_count == len(self.model.msgs)
            assert all(m.status == "complete" for m in conv.messages)

    return Branches


def test_branch_structure_matches_model(store: Store) -> None:
    run_state_machine_as_test(make_machine(store), settings=settings(
        max_examples=25, stateful_step_count=15, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))
