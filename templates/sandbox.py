"""The Jinja environment chat templates render in: sandboxed, with `apply_chat_template`'s semantics.

Chat templates come from model repositories and are untrusted code. They render in jinja2's
`ImmutableSandboxedEnvironment`, which refuses attribute access to Python internals
(`__class__`, `__globals__`, ...) and mutation of the inputs. The extras below are the ones
`transformers` installs, so a template renders byte-identically here and there.

The sandbox also bounds what one render may cost (`LIMITS`): a template could otherwise build a
300 MB string (`{{ 'x' * 300000000 }}`) or run nested loops for hours. Each limit raises
`jinja2.exceptions.SecurityError`, which `ChatTemplate.render` reports as a `TemplateSecurityError`
naming the template. Real chat templates stay far below every limit.
"""

from __future__ import annotations

import functools
import json
import operator
import re
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass
class SandboxLimits:
    """What one render of a template may cost. Each bound raises a SecurityError when crossed."""

    max_string: int = 16 * 2**20  # characters of any string the template builds, and of the whole output
    max_items: int = 1_000_000  # items of any list or tuple the template builds
    max_range: int = 100_000  # items of one range() (Jinja's own sandbox bound)
    max_loop_iterations: int = 1_000_000  # iterations of all {% for %} loops together
    max_int_bits: int = 1 << 16  # bits of an integer `**` may produce
    max_seconds: float = 10.0  # wall time of one render


LIMITS = SandboxLimits()


def _exceeded(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"render limit: {what} (see prefill_kit.templates.sandbox.LIMITS)")


@dataclass
class _Budget:
    """What the render under way has used so far."""

    deadline: float
    iterations: int = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _exceeded(f"rendering one row took more than {LIMITS.max_seconds:g} s")


_BUDGET: ContextVar[_Budget | None] = ContextVar("prefill_kit_sandbox_budget", default=None)


def _check_time() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()


def _check_size(value: Any) -> Any:
    """`value` itself, unless it is a string or sequence longer than the limits allow."""
    if isinstance(value, str):
        if len(value) > LIMITS.max_string:
            raise _exceeded(f"a string of {len(value):,} characters, more than {LIMITS.max_string:,}")
    elif isinstance(value, list | tuple) and len(value) > LIMITS.max_items:
        raise _exceeded(f"a list of {len(value):,} items, more than {LIMITS.max_items:,}")
    return value


def _check_repeat(seq: Any, times: Any) -> None:
    """Refuse `seq * times` before it is built, when it would be too long."""
    if isinstance(seq, str | list | tuple) and isinstance(times, int) and not isinstance(times, bool):
        _check_size_of(len(seq) * max(times, 0), seq)


def _check_size_of(length: int, like: Any) -> None:
    limit, unit = (LIMITS.max_string, "characters") if isinstance(like, str) else (LIMITS.max_items, "items")
    if length > limit:
        raise _exceeded(f"a {'string' if unit == 'characters' else 'list'} of {length:,} {unit}, more than {limit:,}")


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        bits = exponent * abs(base).bit_length()
        if bits > LIMITS.max_int_bits:
            raise _exceeded(f"an integer of about {bits:,} bits from **, more than {LIMITS.max_int_bits:,}")


_WIDTH = re.compile(r"\d+")


def _check_arguments(args: Iterable[Any]) -> None:
    """Refuse widths and counts no template needs (`center(10**9)`, `'%999999999d'`, `'{:>999999999}'`)
    before the C code they reach allocates them."""
    for arg in args:
        if type(arg) is int and arg > LIMITS.max_string:
            raise _exceeded(f"a width or count of {arg:,}, more than the {LIMITS.max_string:,} characters a string "
                            "may hold")


def _check_format(text: Any) -> None:
    if isinstance(text, str):
        _check_arguments(int(m[0]) for m in _WIDTH.finditer(text) if len(m[0]) > 6)


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = text.count(old) if old else len(text) + 1
        _check_size_of(len(text) + count * (len(new) - len(old)), text)


def _bounded_call(fn, args: tuple, kwargs: dict) -> Any:
    """Call `fn` with the argument checks before and the size check after; a failed allocation is a limit too."""
    _check_time()
    _check_arguments([*args, *kwargs.values()])
    try:
        return _check_size(fn(*args, **kwargs))
    except MemoryError:
        raise _exceeded("the template ran out of memory") from None


def _bounded_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args, **kwargs):
        if name == "replace":
            values = [a for a in args if isinstance(a, str)][-3:]
            if len(values) == 3:
                _check_replace(*values)
        elif name == "format" and args:
            _check_format(next((a for a in args if isinstance(a, str)), None))
        return _bounded_call(fn, args, kwargs)

    return bounded


def _guarded_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """What every `{% for %}` iterates: the same items, counted against the render's budget."""
    budget = _BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.iterations += 1
            if budget.iterations > LIMITS.max_loop_iterations:
                raise _exceeded(f"more than {LIMITS.max_loop_iterations:,} loop iterations")
            if not budget.iterations % 256:
                budget.check_time()
        yield item


_LOOP_GUARD = "prefill_kit_loop_guard"


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > LIMITS.max_range:
        raise _exceeded(f"range() of {len(r):,} items, more than {LIMITS.max_range:,}")
    return r


class _BoundedTemplate(jinja2.Template):
    """`render` with a budget: loop iterations, wall time and the output's size are counted as it is made."""

    @functools.cached_property
    def _flat_globals(self) -> dict[str, Any]:
        """`self.globals` (a ChainMap over the environment's globals) as one dict, built once: jinja copies the
        ChainMap key by key on every render, about a third of a chat template's render time. The same mapping:
        the sandbox's globals are fixed when `_ENV` is made, and nothing writes a compiled template's globals."""
        return dict(self.globals)

    def new_context(self, vars: dict[str, Any] | None = None, shared: bool = False, locals: Any = None):
        """`jinja2.runtime.new_context` for the usual call (not shared, no locals) with the globals flattened
        once; any other call goes to jinja's own."""
        if shared or locals:
            return super().new_context(vars, shared, locals)
        flat = self._flat_globals
        return self.environment.context_class(self.environment, {**flat, **(vars or {})}, self.name, self.blocks,
                                              globals=flat)

    def render(self, *args: Any, **kwargs: Any) -> str:
        token = _BUDGET.set(_Budget(time.monotonic() + LIMITS.max_seconds))
        try:
            return "".join(_bounded_output(self.root_render_func(self.new_context(dict(*args, **kwargs)))))
        except Exception:
            self.environment.handle_exception()  # re-raises, as jinja2.Template.render does
        finally:
            _BUDGET.reset(token)


def _bounded_output(pieces: Iterable[str]) -> Iterator[str]:
    """The rendered pieces, stopped once they add up to more than `LIMITS.max_string` characters.

    (Time is checked in loops and calls: output alone cannot take long.)
    """
    size, limit = 0, LIMITS.max_string
    for piece in pieces:
        size += len(piece)
        if size > limit:
            raise _exceeded(f"output longer than {limit:,} characters")
        yield piece


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, _check_size(value))  # where a template can accumulate

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox turns a blocked attribute into an Undefined that renders as "" when printed.
    Here the attempt itself is an error, so a hostile template fails loudly instead of quietly."""

    template_class = _BoundedTemplate
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator_name, left, right):
        if operator_name == "+":  # the common case (chat templates concatenate): both sides are within bounds
            return _check_size(left + right)
        if operator_name == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator_name == "**":
            _check_power(left, right)
        elif operator_name == "%":
            _check_format(left)
        return _bounded_call(_BINOPS[operator_name], (left, right), {})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature, to avoid name clashes
        name = getattr(__obj, "__name__", None)
        bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
        if name == "replace" and len(args) >= 2:
            _check_replace(bound_to, args[0], args[1])
        elif name in ("format", "format_map"):
            _check_format(bound_to)
        return _bounded_call(super().call, (__context, __obj, *args), kwargs)

    def _generate(self, source, name, filename, defer_init=False):
        """Compile every `{% for x in it %}` as `{% for x in it|loop_guard %}`, so loops count against the budget."""
        for loop in source.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None).set_lineno(loop.iter.lineno)
        return super()._generate(source, name, filename, defer_init)


_BINOPS = {"*": operator.mul, "+": operator.add, "**": operator.pow, "%": operator.mod}


def _make_env() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    env.filters[_LOOP_GUARD] = _guarded_loop
    env.globals["range"] = _range
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


_ENV = _make_env()


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct source; raises `jinja2.TemplateSyntaxError`."""
    return _ENV.from_string(source)
