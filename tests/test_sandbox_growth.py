"""Every operator that can grow a value is refused *before* the value is built, within seconds.

Each hostile template crosses a limit three ways: by recursion (a macro calling itself with a larger
argument), by doubling (`{% set a = a ~ a %}` again and again) and by repetition (one operation
over many copies). A check made only *after* the allocation would still raise the same error, so
each case also bounds the render's peak memory (`tracemalloc`): the largest value a render may hold
is `LIMITS.max_string` characters, and a refused step must not have allocated its result.

The templates run in one child process whose address space is capped (`RLIMIT_AS`), so that a broken
guard fails the test with a MemoryError instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# LIMITS.max_string is 16 Mi characters, here all ASCII (1 byte each): the peak allows the largest legal
# value, the half of it it was made from, and room for the rest, but not a value past the limit.
PEAK_BOUND = 40 * 2**20
ADDRESS_SPACE = 2**30  # the child's cap: a guard that allocates first fails there, quickly and safely

# A seed string of 1M characters, and one of 10M (one step from the limit).
S1, S10 = "{% set s = 'x' * 1000000 %}", "{% set s = 'x' * 10000000 %}"


def recursion(step: str, seed: str = "'x'", depth: int = 64) -> str:
    """A macro calling itself with `step` (an expression of `s`), `depth` calls deep."""
    return ("{% macro f(s, n) %}{% if n %}{{ f(" + step + ", n - 1) }}{% else %}{{ s|length }}{% endif %}"
            "{% endmacro %}{{ f(" + seed + f", {depth}) }}}}")


def doubling(step: str, seed: str = "'x'", times: int = 64) -> str:
    """`{% set s = step %}` `times` over, at the top level (no namespace checks the value)."""
    return "{% set s = " + seed + " %}" + ("{% set s = " + step + " %}") * times + "{{ s|length }}"


def many(expr: str, sep: str, count: int = 200) -> str:
    return sep.join([expr] * count)


ARGS = ", ".join(["s"] * 200)
CASES = {
    # ~ (concatenation)
    "concat-recursion": recursion("s ~ s ~ s ~ s"),
    "concat-doubling": doubling("s ~ s"),
    "concat-repetition": S10 + "{{ (" + many("s", " ~ ") + ")|length }}",
    # +
    "plus-recursion": recursion("s + s + s + s"),
    "plus-doubling": doubling("s + s"),
    "plus-repetition": S10 + "{{ (" + many("s", " + ", 8) + ")|length }}",  # each + nests: Python's parser
    "plus-lists-doubling": doubling("s + s", "[0]"),
    # * in both orders
    "times-str-int-recursion": recursion("s * 4"),
    "times-int-str-recursion": recursion("4 * s"),
    "times-str-int-doubling": doubling("s * 2"),
    "times-int-str-doubling": doubling("2 * s"),
    "times-str-int-repetition": "{% set s = 'x' * 1000 %}{{ (s * 16000000)|length }}",
    "times-int-str-repetition": "{% set s = 'x' * 1000 %}{{ (16000000 * s)|length }}",
    "times-int-list-repetition": "{% set s = [0] * 1000 %}{{ (16000000 * s)|length }}",
    # % : its arguments and its widths
    "percent-recursion": recursion("'%s%s%s%s' % (s, s, s, s)"),
    "percent-doubling": doubling("'%s%s' % (s, s)"),
    "percent-repetition": S10 + "{{ (('%s' * 200) % (" + ARGS + "))|length }}",
    "percent-mapping-repetition": S10 + "{{ (('%(a)s' * 200) % {'a': s})|length }}",
    "percent-width-repetition": "{{ (('%16000000d' * 200) % (" + many("1", ", ") + "))|length }}",
    "percent-star-width-repetition": "{{ (('%*d' * 200) % (" + many("16000000, 1", ", ") + "))|length }}",
    # str.format, format_map and the format filter: arguments and widths
    "format-recursion": recursion("'{0}{0}{0}{0}'.format(s)"),
    "format-doubling": doubling("'{0}{0}'.format(s)"),
    "format-repetition": S10 + "{{ ('{0}' * 200).format(s)|length }}",
    "format-width-repetition": "{{ ('{0:>16000000}' * 200).format(1)|length }}",
    "format-nested-width-repetition": "{{ ('{0:{1}}' * 200).format('x', 16000000)|length }}",
    "format-map-repetition": S10 + "{{ ('{a}' * 200).format_map({'a': s})|length }}",
    "format-filter-doubling": doubling("'%s%s'|format(s, s)"),
    "format-filter-repetition": S10 + "{{ (('%s' * 200)|format(" + ARGS + "))|length }}",
    # join, the filter and the method
    "join-filter-recursion": recursion("[s, s, s, s]|join"),
    "join-filter-doubling": doubling("[s, s]|join"),
    "join-filter-repetition": S10 + "{{ ([s] * 200)|join|length }}",
    "join-filter-separator-repetition": S10 + "{{ (['a'] * 200)|join(s)|length }}",
    "join-method-doubling": doubling("''.join([s, s])"),
    "join-method-repetition": S10 + "{{ ''.join([s] * 200)|length }}",
    "join-method-separator-repetition": S10 + "{{ s.join(['a'] * 200)|length }}",
    # filters and string methods that repeat
    "replace-doubling": doubling("s|replace('x', 'xx')"),
    "replace-method-recursion": recursion("s.replace('x', 'xxxx')"),
    "center-doubling": doubling("s|center((s|length) * 2)"),
    "ljust-doubling": doubling("s.ljust((s|length) * 2)"),
    "zfill-recursion": recursion("s.zfill((s|length) * 4)"),
    "indent-repetition": "{{ ('\\na' * 1000)|indent(16000000)|length }}",
    "indent-string-repetition": S10 + "{{ ('\\na' * 200)|indent(s)|length }}",
    "wordwrap-repetition": S10 + "{{ ('a ' * 200)|wordwrap(1, wrapstring=s)|length }}",
    "expandtabs-repetition": "{{ ('\\t' * 1000).expandtabs(16000000)|length }}",
    "translate-repetition": S10 + "{{ ('x' * 200).translate({120: s})|length }}",
    "tojson-indent-repetition": "{{ [[[0] * 100] * 100]|tojson(indent=16000000)|length }}",
    "string-filter-repetition": S10 + "{{ ([s] * 200)|string|length }}",
    "print-container-repetition": S10 + "{{ [s] * 200 }}",
    "sum-lists-repetition": "{{ ([[0] * 900000] * 300)|sum(start=[])|length }}",
    "lipsum-repetition": "{{ lipsum(16000000)|length }}",
}

# The wall clock: loops with and without a call inside, and recursion (every macro call is a call).
SLOW = {
    "time-loop-without-calls": "{% set xs = range(999)|list %}{% for a in xs %}{% for b in xs %}{% set x = b %}"
                               "{% endfor %}{% endfor %}",  # no call inside: range(9) in the loop would be one
    "time-loop-with-calls": "{% for i in range(100000) %}{% for j in range(9) %}{{ 'x'.upper()|length }}"
                            "{% endfor %}{% endfor %}",
    "time-recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(19) }}",
}
MAX_SECONDS = 0.2  # the render time limit in the child, for SLOW: each of them runs for seconds unbounded

CHILD = r"""
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from prefill_kit.templates import ChatTemplate
from prefill_kit.templates import sandbox

results = {}
for name, source, max_seconds in json.load(sys.stdin):
    sandbox.LIMITS.max_seconds = max_seconds
    tracemalloc.start()
    start = time.monotonic()
    try:
        out = ChatTemplate(source, name).render([{"role": "user", "content": "hi"}])
        error = ["none", out[:200]]
    except BaseException as e:  # a MemoryError too: the test names what it got
        error = [type(e).__name__, str(e)[:500]]
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results[name] = {"error": error, "seconds": seconds, "peak": peak}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """Every case rendered once, in one child process with a capped address space."""
    cases = [[n, s, 10.0] for n, s in CASES.items()] + [[n, s, MAX_SECONDS] for n, s in SLOW.items()]
    done = subprocess.run([sys.executable, "-c", CHILD, str(ADDRESS_SPACE)], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", CASES)
def test_growth_is_refused_before_it_is_built(outcomes, name):
    outcome = outcomes[name]
    kind, message = outcome["error"]
    assert kind == "TemplateSecurityError", f"{kind}: {message}"
    assert "render limit: " in message and "out of memory" not in message, message
    assert outcome["seconds"] < 5
    assert outcome["peak"] < PEAK_BOUND, f"peak {outcome['peak'] / 2**20:.0f} MiB: built before it was refused"


@pytest.mark.parametrize("name", SLOW)
def test_the_wall_clock_is_checked_in_loops_calls_and_recursion(outcomes, name):
    kind, message = outcomes[name]["error"]
    assert kind == "TemplateSecurityError", f"{kind}: {message}"
    assert f"rendering one row took more than {MAX_SECONDS:g} s" in message
    assert outcomes[name]["seconds"] < MAX_SECONDS + 2


def test_the_cases_grow_only_past_the_limit():
    """Each case's growth is what the limit stops: the same templates render when they stay below it."""
    from prefill_kit.templates import ChatTemplate

    small = {
        doubling("s ~ s", times=20): 2**20, doubling("2 * s", times=20): 2**20, doubling("s + s", "[0]", 19): 2**19,
        recursion("[s, s, s, s]|join", depth=10): 4**10, recursion("'{0}{0}{0}{0}'.format(s)", depth=10): 4**10,
        doubling("'%s%s' % (s, s)", times=20): 2**20, recursion("s.replace('x', 'xxxx')", depth=10): 4**10,
    }
    for source, expected in small.items():
        assert ChatTemplate(source, "small").render([]) == str(expected)
