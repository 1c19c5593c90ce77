"""A chat template is the model file's code: one that loops for minutes or builds a huge string is stopped with
ChatTemplateError, within its deadline and without the memory it asks for."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from chatcore.tokenizer import chat_template
from chatcore.tokenizer.chat_template import ChatTemplateError, render

MESSAGES = [{"role": "user", "content": "call 5551234567, or 123456789012345"}]


def _render(source: str, **bounds: float) -> str:
    return render(source, MESSAGES, add_generation_prompt=True, special_tokens={"bos_token": "<s>"}, **bounds)


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",   # no output at all
    "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j % 2 }}{% endfor %}{% endfor %}",
    # made once, then looped over with no call and no output in the loops
    "{% set l = range(1000) | list %}{% for a in l %}{% for b in l %}{% for c in l %}{% endfor %}{% endfor %}"
    "{% endfor %}",
    "{% set l = range(1000) | list %}{% set y %}{% for a in l %}{% for b in l %}{% for c in l %}ab{% endfor %}"
    "{% endfor %}{% endfor %}{% endset %}",
])
def test_a_template_that_loops_for_hours_stops_at_its_deadline(source: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=r"still rendering after 0\.3 s") as info:
        _render(source, max_seconds=0.3)
    assert time.perf_counter() - t0 < 30   # a hang bound only: the message says the deadline stopped it
    assert "\n" not in str(info.value)


def test_the_default_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.2)
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="loops too long"):
        _render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert time.perf_counter() - t0 < 30   # a hang bound only: the message says the deadline stopped it


@pytest.mark.parametrize("source", [
    "{{ 'x' * 10**10 }}",
    "{{ ['x'] * 10**10 }}",
    "{{ 'x' | center(10**10) }}",
    "{{ 'x'.rjust(10**10) }}",
    "{{ 'x' | indent(10**10, true) }}",
    "{{ '%10000000000s' | format('x') }}",
    "{{ '%10000000000s' % 'x' }}",
    "{{ '{:>10000000000}'.format('x') }}",
    "{{ '{0:>10000000000}'.format_map({}) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set s = 'x' * 1000 %}" + "{% set s = s ~ s %}" * 40 + "{{ s }}",
    "{% set s = 'x' * 1000 %}" + "{% set s = s + s %}" * 40 + "{{ s }}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s }}{% endmacro %}{{ f('x', 60) }}",
    # a few MB emitted 100,000 times, into a {% set %} block that is never output
    "{% set s = 'x' * 3000000 %}{% set y %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
])
def test_a_template_that_builds_a_huge_string_is_stopped_early(source: str) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ChatTemplateError, match="more than the|grew past") as info:
            _render(source, max_seconds=120)   # the size bound must stop it, not the deadline (CI may be slow)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 120   # a hang bound only
    assert peak < 64 * 2**20     # the bound is 4 M characters (and 4x the inputs): never GBs
    assert "\n" not in str(info.value)


def test_the_output_bound_is_configurable_and_grows_with_the_inputs() -> None:
    source = "{% for m in messages %}{{ m.content }}{% endfor %}{{ 'x' * 1000 }}"
    with pytest.raises(ChatTemplateError, match="more than the"):
        _render(source, max_chars=100)
    long = [{"role": "user", "content": "a" * 5_000_000}]
    out = render(source, long, add_generation_prompt=False, special_tokens={})
    assert len(out) == 5_001_000   # inputs longer than the bound render: the bound is 4 M + 4 x theirs


def test_ordinary_templates_and_numbers_in_messages_render() -> None:
    source = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim | wordwrap(80) }}"
              "{{ m.content | indent(2) }}{% endfor %}{{ '%s-%05d' % ('a', 3) }}{{ 'ab'.center(6) }}"
              "{{ '{:>4}'.format(7) }}{{ 2 ** 10 }}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    out = _render(source)
    content = MESSAGES[0]["content"]
    assert out == f"<s><|user|>{content}{content}a-00003  ab     7" + "1024<|assistant|>"


def test_recursion_without_end_is_one_line() -> None:
    with pytest.raises(ChatTemplateError, match="RecursionError") as info:
        _render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
    assert "\n" not in str(info.value)
