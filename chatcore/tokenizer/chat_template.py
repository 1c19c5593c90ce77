"""Render a model's own Jinja chat template the way transformers renders it.

Same environment settings (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls), the same extra
globals (``raise_exception``, ``strftime_now``), a ``tojson`` filter that keeps non-ASCII text, and the
``{% generation %}`` block tag accepted (and rendered transparently).

A template is the model file's code, so rendering is bounded: it stops with :class:`ChatTemplateError` past
a deadline (:data:`MAX_SECONDS`, checked at every loop iteration, call and output) or when a string it
builds or emits grows past :data:`MAX_CHARS` plus four times the size of its inputs (checked before a
``*``, ``%`` or ``**`` and a padding call or filter runs, and after every concatenation, call, attribute
read and output). The sandbox's own ``range`` limit (100,000 items) stays.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatcore.errors import ChatcoreError


class ChatTemplateError(ChatcoreError):
    """The chat template failed to render (the template raised, or the messages do not fit its rules)."""


class _GenerationTag(Extension):
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


MAX_SECONDS = 2.0          # one render's deadline
MAX_CHARS = 4_000_000      # the longest string a render may build or emit, besides 4 x its inputs' size


@dataclass
class _Bounds:
    deadline: float
    seconds: float
    max_chars: int
    emitted: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: still rendering after {self.seconds:g} s; the template loops "
                                    "too long (raise chat_template.MAX_SECONDS if it is trusted)")

    def size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict, bytes)) and len(value) > self.max_chars:
            self.count(len(value))
        return value

    def count(self, n: int) -> None:
        if n > self.max_chars:
            raise ChatTemplateError(f"chat template: builds a value of {n} items, more than the "
                                    f"{self.max_chars} allowed (raise chat_template.MAX_CHARS if it is trusted)")


_BOUNDS: contextvars.ContextVar[_Bounds | None] = contextvars.ContextVar("chat_template_bounds", default=None)
_PADDING = {"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map", "indent", "wordwrap"}
_DIGITS = re.compile(r"\d+")


def _bounds() -> _Bounds:
    b = _BOUNDS.get()   # None: rendered outside render() (a compiled template used directly): default bounds
    return b if b is not None else _Bounds(time.monotonic() + MAX_SECONDS, MAX_SECONDS, MAX_CHARS)


def _precheck(b: _Bounds, counts: Sequence[Any], spec: Any = None) -> None:
    """Refuse widths and counts (ints), and widths in a format string ``spec``, that would build a value past
    the bound in one step."""
    for a in counts:
        if isinstance(a, int) and not isinstance(a, bool):
            b.count(abs(a))
    if isinstance(spec, str):
        for d in _DIGITS.findall(spec):
            b.count(int(d) if len(d) < 12 else 10**12)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})   # checked before they run; + and ~ after (_instrument)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        b = _bounds()
        b.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    b.count(len(seq) * n)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            b.count(int(abs(right) * max(abs(left), 2).bit_length() / 4))   # ~ the result's decimal digits
        elif operator == "%" and isinstance(left, str):
            _precheck(b, (), left)
        return b.size(super().call_binop(context, operator, left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        b = _bounds()
        b.tick()
        name = getattr(__obj, "__name__", None)
        if name in _PADDING:
            spec = getattr(__obj, "__self__", None) if name in ("format", "format_map") else None
            _precheck(b, [*args, *kwargs.values()], spec)
        return b.size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = super().wrap_str_format(value)
        if fmt is not None:   # str.format / format_map: widths in the format string checked before it runs
            _precheck(_bounds(), (), value.__self__)
        return fmt


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        b = _bounds()
        b.tick()
        if name in _PADDING:
            rest = list(args)
            while rest and isinstance(rest[0], (jinja2.runtime.Context, jinja2.Environment, nodes.EvalContext)):
                rest.pop(0)   # pass_context / pass_environment / pass_eval_context filters
            value, params = (rest[0] if rest else None), [*rest[1:], *kwargs.values()]
            _precheck(b, params, value if name == "format" else None)
        return b.size(f(*args, **kwargs))

    for attr in ("jinja_pass_arg",):   # pass_context / pass_environment / pass_eval_context markers
        if hasattr(f, attr):
            setattr(bounded, attr, getattr(f, attr))
    return bounded


# pass_context: never folded into a constant at compile time (the optimizer calls filters on constants)
@jinja2.pass_context
def _tick(_: jinja2.runtime.Context, __: None) -> None:
    _bounds().tick()


@jinja2.pass_context
def _emit(_: jinja2.runtime.Context, value: Any) -> Any:
    """An output of the template: counted against the bound (in {% set %} blocks and macros too)."""
    b = _bounds()
    b.tick()
    b.emitted += len(value) if isinstance(value, str) else len(str(value))
    if b.emitted > b.max_chars:
        raise ChatTemplateError(f"chat template: its output grew past {b.max_chars} characters "
                                "(raise chat_template.MAX_CHARS if it is trusted)")
    return value


@jinja2.pass_context
def _size(_: jinja2.runtime.Context, value: Any) -> Any:
    return _bounds().size(value)


def _instrument(tree: nodes.Template) -> nodes.Template:
    """A tick at the start of every loop iteration; every output counted, every ``+`` and ``~`` result
    measured (as filters: a direct call each, not the sandbox's call)."""
    def check(name: str, node: nodes.Expr) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def wrap(value: Any) -> Any:
        return check("chatcore_size", value) if isinstance(value, (nodes.Concat, nodes.Add)) else value

    for parent in list(tree.find_all(nodes.Node)):
        if isinstance(parent, (nodes.Concat, nodes.Add)):
            continue   # a chain is measured once, at its end: its parts are at most k x the bound
        for field in parent.fields:
            value = getattr(parent, field)
            setattr(parent, field, [wrap(v) for v in value] if isinstance(value, list) else wrap(value))
    for loop in tree.find_all(nodes.For):
        loop.body.insert(0, nodes.ExprStmt(check("chatcore_tick", nodes.Const(None, lineno=loop.lineno)),
                                           lineno=loop.lineno))
    for out in tree.find_all(nodes.Output):
        out.nodes = [check("chatcore_emit", nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData)
                           else n) for n in out.nodes]
    return tree


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(chatcore_tick=_tick, chatcore_emit=_emit, chatcore_size=_size)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(_instrument(env.parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from None


def _input_size(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 20:
        return 0
    if isinstance(value, Mapping):
        return sum(_input_size(k, depth + 1) + _input_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_input_size(v, depth + 1) for v in value)
    return 0


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, str | None], max_chars: int | None = None,
           max_seconds: float | None = None, **extra: Any) -> str:
    """The template rendered, within :data:`MAX_SECONDS` and :data:`MAX_CHARS` (plus 4 x the inputs' size;
    ``max_chars`` / ``max_seconds`` set other bounds) or :class:`ChatTemplateError`."""
    variables = dict(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                     **dict(special_tokens), **extra)
    limit = (MAX_CHARS if max_chars is None else max_chars) + 4 * _input_size(variables)
    seconds = MAX_SECONDS if max_seconds is None else max_seconds
    token = _BOUNDS.set(_Bounds(time.monotonic() + seconds, seconds, limit))
    try:
        return compile_template(source).render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _BOUNDS.reset(token)
