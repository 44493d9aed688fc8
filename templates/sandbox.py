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
import types
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.visitor
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
    elif isinstance(value, (list, tuple)) and len(value) > LIMITS.max_items:  # a tuple of types: faster than a union
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


def _text_size(value: Any) -> int:
    """An upper bound of `len(str(value))`, found without building the string: a container's text
    holds its items' reprs. Counting stops once past the string limit, so a hostile value costs little."""
    size, stack, limit = 0, [value], LIMITS.max_string
    while stack and size <= limit:
        v = stack.pop()
        if isinstance(v, str):
            size += len(v) if v is value else _repr_size(v)
        elif isinstance(v, list | tuple | set | frozenset):
            size += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            size += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, jinja2.utils.Namespace):
            size += 16
            stack.append(v._Namespace__attrs)  # its repr shows its attributes
        elif isinstance(v, int) and not isinstance(v, bool):
            size += 2 + v.bit_length() // 3  # decimal digits, from above
        else:
            size += 64  # floats, None, Undefined, macros: short reprs
    return size


def _repr_size(text: str) -> int:
    """An upper bound of `len(repr(text))`: quotes, and escapes of up to 10 characters where not printable."""
    return 2 + (len(text) + text.count("\\") + text.count("'") if text.isprintable() else 10 * len(text))


def _check_text(value: Any) -> Any:
    """`value` itself, unless its text (what `str()` would build) is longer than the limit."""
    if type(value) is not str:
        size = _text_size(value)
        if size > LIMITS.max_string:
            raise _exceeded(f"text of more than {LIMITS.max_string:,} characters")
    return value


def _check_concat(pieces: Iterable[Any]) -> str:
    """`a ~ b ~ ...`, refused before it is built when too long (jinja's own `str_join` otherwise)."""
    pieces = list(pieces)
    _check_size_of(sum(_text_size(p) for p in pieces), "")
    return "".join(map(str, pieces))


def _check_join(items: Any, separator: Any) -> list:
    """The items, as a list; refused when `separator.join(items)` would be too long."""
    items = list(items)
    sep = len(separator) if isinstance(separator, str) else _text_size(separator)
    _check_size_of(sum(_text_size(i) for i in items) + sep * max(len(items) - 1, 0), "")
    return items


def _argument_size(arg: Any) -> int:
    """What one argument of a format may add: its text, or, for an int, the width it may stand for."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return max(_text_size(arg), arg)
    return _text_size(arg)


def _check_formatted(text: Any, args: Iterable[Any], mark: str) -> None:
    """Refuse `text % args` or `text.format(*args)` before it is built, when it could be too long:
    each `mark` may insert the longest argument, and each number in `text` may be a width."""
    if isinstance(text, str):
        _check_format(text)
        widths = sum(int(m[0]) for m in _WIDTH.finditer(text))
        longest = max(map(_argument_size, args), default=0)
        _check_size_of(len(text) + widths + text.count(mark) * longest, text)


def _format_args(args: Any) -> list:
    """The values `%` formats with: a tuple's items, a mapping's values, or the one value."""
    if isinstance(args, tuple):
        return list(args)
    if isinstance(args, dict):
        return list(args.values())
    return [args]


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
    _check_arguments(args)
    if kwargs:
        _check_arguments(kwargs.values())
    try:
        return _check_size(fn(*args, **kwargs))
    except MemoryError:
        raise _exceeded("the template ran out of memory") from None


# The filters whose result `_check_filter` measures before it is built. Any other filter's `_check_filter`
# returns its arguments unchanged, so they skip it (a third of a filter call's cost) and go straight to the
# bounded call: the same checks, the same result.
_SIZED_FILTERS = frozenset({"replace", "format", "join", "string", "indent", "wordwrap", "sum"})


def _bounded_filter(name: str, fn):
    if name not in _SIZED_FILTERS:
        @functools.wraps(fn)  # keeps jinja's pass_context / pass_eval_context marks
        def bounded(*args, **kwargs):
            return _bounded_call(fn, args, kwargs)
    else:
        @functools.wraps(fn)
        def bounded(*args, **kwargs):
            return _bounded_call(fn, _check_filter(name, list(args), kwargs), kwargs)

    return bounded


_PASSED = (jinja2.nodes.EvalContext, jinja2.Environment, jinja2.runtime.Context)


def _check_filter(name: str, args: list, kwargs: dict) -> tuple:
    """Refuse, before the filter builds it, a result longer than the limits. Returns the arguments, an
    iterable value read into a list (so that it can be measured and then used)."""
    head = next((i for i, a in enumerate(args) if not isinstance(a, _PASSED)), len(args))
    value, rest = (args[head], args[head + 1:]) if head < len(args) else (None, [])

    def arg(index: int, key: str, default: Any) -> Any:
        return rest[index] if len(rest) > index else kwargs.get(key, default)

    if name == "replace":
        values = [a for a in args if isinstance(a, str)][-3:]
        if len(values) == 3:
            _check_replace(*values)
    elif name == "format":
        _check_formatted(value, [*rest, *kwargs.values()], "%")
    elif name == "join" and value is not None:
        args[head] = _check_join(value, arg(0, "d", ""))
    elif name == "string":
        _check_text(value)
    elif name == "indent" and isinstance(value, str):
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else _argument_size(width)
        _check_size_of(len(value) + (value.count("\n") + 1) * width, value)
    elif name == "wordwrap" and isinstance(value, str):
        wrap = arg(2, "wrapstring", None)
        _check_size_of(len(value) * (1 + (len(wrap) if isinstance(wrap, str) else 2)), value)
    elif name == "sum" and value is not None and isinstance(arg(1, "start", 0), str | list | tuple):
        args[head] = items = list(value)
        start = arg(1, "start", 0)
        _check_size_of(len(start) + sum(_text_size(i) if arg(0, "attribute", None) is not None
                                        else len(i) if isinstance(i, str | list | tuple) else 0 for i in items), start)
    return tuple(args)


def _check_method(text: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse, before it is built, a too long result of a str method that can grow its string."""
    if name == "replace" and len(args) >= 2:
        _check_replace(text, args[0], args[1])
    elif name == "format":
        _check_formatted(text, [*args, *kwargs.values()], "{")
    elif name == "format_map" and args and isinstance(args[0], dict):
        _check_formatted(text, list(args[0].values()), "{")
    elif name == "join" and len(args) == 1:
        args = (_check_join(args[0], text),)
    elif name == "translate" and args and isinstance(args[0], dict):
        _check_size_of(len(text) * max([1, *map(_text_size, args[0].values())]), text)
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            _check_size_of(len(text) + text.count("\t") * max(tabsize, 0), text)
    return args


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
_CONCAT = "prefill_kit_concat"


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
            context = self.new_context(dict(*args, **kwargs) if args else kwargs)  # kwargs: a dict of its own
            return "".join(_bounded_output(self.root_render_func(context)))
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
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps. `iterencode` makes
    # the same text as `json.dumps`, in pieces, so that a large `indent` is refused as the text grows.
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    if indent is not None:  # one piece holds the indent once per level of nesting
        _check_size_of((len(indent) if isinstance(indent, str) else _argument_size(indent)) * _depth(x), "")
    pieces, size = [], 0
    for piece in encoder.iterencode(x):
        size += len(piece)
        if size > LIMITS.max_string:
            raise _exceeded(f"tojson text of more than {LIMITS.max_string:,} characters")
        pieces.append(piece)
    return "".join(pieces)


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in `value` (what `tojson`'s indent multiplies), walking at most
    `LIMITS.max_items` of them (shared items would otherwise be walked again and again)."""
    deepest, stack, walked = 0, [(value, 0)], 0
    while stack:
        v, depth = stack.pop()
        deepest, walked = max(deepest, depth), walked + 1
        if walked > LIMITS.max_items:
            raise _exceeded(f"tojson with an indent over more than {LIMITS.max_items:,} items")
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list | tuple):
            stack.extend((item, depth + 1) for item in v)
    return deepest


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja's argument names
    # n paragraphs of up to `max` words, each up to 12 letters and a space
    _check_size_of(_argument_size(n) * _argument_size(max) * 16, "")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


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

    def getattr(self, obj, attribute):
        """jinja's sandboxed `getattr` (the attribute, else the item, else undefined; an unsafe attribute is an
        error), with the per-call safety check decided once per type for the objects chat templates read
        on every row: `message.role`, `ns.index`, `loop.last`, `text.strip`.

        - An exact `dict` has only its class's attributes, so a name that is not one of them is no attribute:
          jinja goes straight to the item, and so does this (without raising an AttributeError first).
        - For an exact `str`, `_Namespace` or `LoopContext`, `is_safe_attribute` refuses exactly the names that
          start with `_`: none of them is a function, method, type, code, frame, generator or known mutable
          container, the only objects it looks further into (`tests/test_sandbox_limits.py` compares both paths).
          `str.format` is still wrapped by jinja's sandboxed formatter.
        Anything else (a dict method such as `items`, a list, any other type) takes jinja's own path.
        """
        kind = type(obj)
        if type(attribute) is str:
            if kind is dict and attribute not in _DICT_ATTRIBUTES:
                return self._item_or_undefined(obj, attribute)
            if kind in _PLAIN_ATTRIBUTE_TYPES and not attribute.startswith("_"):
                try:
                    value = getattr(obj, attribute)
                except AttributeError:
                    return self._item_or_undefined(obj, attribute)
                if type(value) in _METHOD_TYPES:  # what `wrap_str_format` looks for (neither type has subclasses)
                    wrapped = self.wrap_str_format(value)
                    return value if wrapped is None else wrapped
                return value
        return super().getattr(obj, attribute)

    def _item_or_undefined(self, obj, attribute: str):
        """What jinja's `getattr` does once `obj` has no such attribute."""
        try:
            return obj[attribute]
        except (TypeError, LookupError):
            return self.undefined(obj=obj, name=attribute)

    def call_binop(self, context, operator_name, left, right):
        """`left <op> right` for the operators jinja's sandbox intercepts, refused before it builds a result over
        the limits. Two `+` shortcuts come first, each what the general path does for those types, minus the
        checks that cannot fire: `str + str` (most of what chat templates compute) checks only the length, and
        `int + int` (a counter: `ns.index + 1`) has no size to check."""
        if operator_name == "+":  # checked before it is built
            if type(left) is str and type(right) is str:
                if len(left) + len(right) > LIMITS.max_string:
                    _check_size_of(len(left) + len(right), left)
                return left + right
            if type(left) is int and type(right) is int:
                return left + right
            if isinstance(left, str | list | tuple) and type(left) is type(right):
                _check_size_of(len(left) + len(right), left)
            return _check_size(left + right)
        if operator_name == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator_name == "**":
            _check_power(left, right)
        elif operator_name == "%":
            _check_formatted(left, _format_args(right), "%")
        return _bounded_call(_BINOPS[operator_name], (left, right), {})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature, to avoid name clashes
        """A call from a template, with the limits' checks. `namespace()`, which many chat templates call on
        every row, goes straight to where the general path ends for it: jinja's `Context.call` passes it no
        context (it has no `jinja_pass_arg`) and drops jinja's own keywords, `is_safe_callable` holds for it, and
        it is bound to no string; the general path looks each of those attributes up, and misses, on every call."""
        if __obj is _Namespace:
            kwargs.pop("_block_vars", None)
            kwargs.pop("_loop_vars", None)
            return _bounded_call(_Namespace, args, kwargs)
        bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
        if isinstance(bound_to, str):
            args = _check_method(bound_to, getattr(__obj, "__name__", None), args, kwargs)
        return _bounded_call(super().call, (__context, __obj, *args), kwargs)

    def _generate(self, source, name, filename, defer_init=False):
        """Compile every `{% for x in it %}` as `{% for x in it|loop_guard %}`, so loops count against the budget,
        and every `a ~ b` as a concatenation measured before it is built."""
        for loop in source.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None).set_lineno(loop.iter.lineno)
        return super()._generate(_BoundedConcat().visit(source), name, filename, defer_init)


class _BoundedConcat(jinja2.visitor.NodeTransformer):
    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Filter:  # noqa: N802 - jinja's visitor names
        self.generic_visit(node)
        return jinja2.nodes.Filter(jinja2.nodes.List(node.nodes), _CONCAT, [], [], None, None).set_lineno(node.lineno)


_DICT_ATTRIBUTES = frozenset(name for klass in dict.__mro__ for name in vars(klass))  # what a dict's getattr finds
_PLAIN_ATTRIBUTE_TYPES = frozenset({str, _Namespace, jinja2.runtime.LoopContext})  # see `_Sandbox.getattr`
_METHOD_TYPES = frozenset({types.MethodType, types.BuiltinMethodType})

_BINOPS = {"*": operator.mul, "+": operator.add, "**": operator.pow, "%": operator.mod}


def _make_env() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    env.filters[_LOOP_GUARD] = _guarded_loop
    env.filters[_CONCAT] = _check_concat
    env.finalize = _check_text  # what `{{ value }}` prints: a container's text is measured before it is built
    env.globals["lipsum"] = _lipsum
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
