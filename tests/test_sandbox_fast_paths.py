"""The sandbox's fast paths (issue 19: render speed) give what jinja's own sandboxed path gives, and refuse
what it refuses: the same value, the same undefined, the same SecurityError."""

from __future__ import annotations

import re

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from prefill_kit.templates import sandbox
from prefill_kit.templates.sandbox import _ENV, _Namespace


def _loop_context() -> jinja2.runtime.LoopContext:
    loop = jinja2.runtime.LoopContext(iter(["a", "b"]), _ENV.undefined)
    next(iter(loop))
    return loop


OBJECTS = {
    # a dict with keys that are also dict methods, an underscore key and a plain key
    "dict": {"role": "user", "items": "an item", "get": 1, "_hidden": 2, "__class__": 3, "update": 4},
    "str": "Hello {0}",
    "namespace": _Namespace(index=1, text="x", method="a{}b".format, upper="x".upper),
    "loop": _loop_context(),
}
EXTRA_NAMES = ("role", "missing", "_hidden", "__class__", "__dict__", "__globals__", "mro", "format", "format_map",
               "index", "text", "method", "upper", "_Namespace__attrs", "first", "last", "cycle", "nextitem")


def _outcome(get, obj, name):
    """What one getattr gives, in comparable form."""
    try:
        value = get(obj, name)
    except jinja2.exceptions.SecurityError as exc:
        return ("refused", str(exc))
    if isinstance(value, jinja2.Undefined):
        return ("undefined", type(value), value._undefined_name, value._undefined_obj is obj, value._undefined_hint)
    if callable(value) and hasattr(value, "__wrapped__"):  # str.format, wrapped anew by the sandbox on each access
        return ("sandboxed format", value.__wrapped__)
    return ("value", value)


@pytest.mark.parametrize("kind", sorted(OBJECTS))
def test_fast_getattr_is_jinjas_getattr(kind):
    obj = OBJECTS[kind]
    names = sorted({*dir(type(obj)), *EXTRA_NAMES})
    jinjas = ImmutableSandboxedEnvironment.getattr.__get__(_ENV)  # the parent class's path, no fast path
    for name in names:
        assert _outcome(_ENV.getattr, obj, name) == _outcome(jinjas, obj, name), (kind, name)


def test_fast_getattr_covers_what_templates_read_per_row():
    """Guards the fast path itself: without it these reads would still be right, only slow."""
    assert type({}) is dict and "role" not in sandbox._DICT_ATTRIBUTES
    assert {str, _Namespace, jinja2.runtime.LoopContext} <= sandbox._PLAIN_ATTRIBUTE_TYPES


@pytest.mark.parametrize("source", [
    "{{ messages[0].items }}", "{{ messages[0].get }}", "{{ ns.index }}", "{{ ns.missing }}", "{{ 'ab'.upper() }}",
    "{% for m in messages %}{{ loop.last }}{{ loop.index0 % 2 }}{% endfor %}", "{{ messages[0].nothing is defined }}",
])
def test_templates_render_as_in_jinjas_sandbox(source):
    messages = [{"role": "user", "content": "x", "items": "an item"}, {"role": "assistant", "content": "y"}]
    theirs = ImmutableSandboxedEnvironment().from_string("{% set ns = namespace(index=3) %}" + source)
    ours = _ENV.from_string("{% set ns = namespace(index=3) %}" + source)
    assert ours.render(messages=messages) == theirs.render(messages=messages)


@pytest.mark.parametrize("source", ["{{ messages[0].update }}", "{{ messages[0].__class__ }}", "{{ ''.__class__ }}",
                                    "{{ ns._Namespace__attrs }}", "{% for m in messages %}{{ loop._iterator }}"
                                    "{% endfor %}"])
def test_fast_getattr_refuses_what_jinja_refuses(source):
    with pytest.raises(jinja2.exceptions.SecurityError):
        _ENV.from_string("{% set ns = namespace(index=3) %}" + source).render(messages=[{"role": "user"}])


def test_every_filter_check_filter_measures_is_a_sized_filter():
    """A filter outside `_SIZED_FILTERS` skips `_check_filter`: that must be one it has no check for."""
    import inspect

    checked = set(re.findall(r'name == "(\w+)"', inspect.getsource(sandbox._check_filter)))
    assert checked == sandbox._SIZED_FILTERS


PLUS_OPERANDS = [("ab", "cd"), ("", ""), (1, 2), (-5, 10**30), (True, 1), (1, True), (1.5, 2), ([1], [2]), ((1,), (2,)),
                 (jinja2.utils.markupsafe.Markup("<b>"), "x"), ("x", jinja2.utils.markupsafe.Markup("<b>"))]


@pytest.mark.parametrize(("left", "right"), PLUS_OPERANDS, ids=repr)
def test_plus_shortcuts_give_pythons_sum(left, right):
    """`str + str` and `int + int` skip the general path's checks: the value and its type stay Python's."""
    got = _ENV.call_binop(None, "+", left, right)
    assert got == left + right and type(got) is type(left + right)


def test_plus_shortcut_refuses_a_string_over_the_limit_before_building_it():
    limit = sandbox.LIMITS.max_string
    half = "x" * (limit // 2)
    assert len(_ENV.call_binop(None, "+", half, "x" * (limit - len(half)))) == limit  # at the limit: allowed
    with pytest.raises(jinja2.exceptions.SecurityError, match=f"a string of {limit + 1:,} characters"):
        _ENV.call_binop(None, "+", half, "x" * (limit - len(half) + 1))


NAMESPACE_CALLS = [((), {}), ((), {"index": 0, "text": "x"}), (({"a": 1},), {"b": 2}), (([("a", 1)],), {}),
                   ((), {"_hidden": 1}), (({"_hidden": 1},), {}), ((), {"big": 10**9}), ((), {"_loop_vars": {"x": 1}}),
                   ((), {"_block_vars": {}, "a": 1}), ((1,), {}), ((), {"a": "x" * 10})]


def _call_outcome(call, args, kwargs):
    try:
        value = call(_ENV.from_string("").new_context({}), _Namespace, *args, **dict(kwargs))
    except (jinja2.exceptions.SecurityError, TypeError) as exc:
        return ("refused", type(exc), str(exc))
    return ("value", type(value), dict(value._Namespace__attrs))


@pytest.mark.parametrize(("args", "kwargs"), NAMESPACE_CALLS, ids=repr)
def test_namespace_shortcut_is_the_general_call(args, kwargs):
    """`namespace(...)` skips the general path's attribute probing: the same namespace, the same refusals."""
    def general(context, obj, *a, **kw):  # the general path, as `_Sandbox.call` takes it for any other callable
        return sandbox._bounded_call(jinja2.sandbox.SandboxedEnvironment.call.__get__(_ENV), (context, obj, *a), kw)

    assert _call_outcome(_ENV.call, args, kwargs) == _call_outcome(general, args, kwargs)
