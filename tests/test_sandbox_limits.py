"""The sandbox bounds what one render may cost; each limit is a TemplateSecurityError naming the template."""

from __future__ import annotations

import time

import pytest

from prefill_kit.errors import TemplateSecurityError
from prefill_kit.templates import ChatTemplate

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("source", "message"), [
    ("{{ 'x' * 300000000 }}", "a string of 300,000,000 characters"),
    ("{{ ([0] * 10000000)|length }}", "a list of 10,000,000 items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "more than 1,000,000 loop iterations"),
    ("{% set xs = range(1000)|list %}{% for a in xs %}{% for b in xs %}{{ '' }}{% endfor %}{% endfor %}",
     "more than 1,000,000 loop iterations"),
    ("{{ range(1000000)|list|length }}", "range() of 1,000,000 items"),
    ("{{ 'x'|center(1000000000) }}", "a width or count of 1,000,000,000"),
    ("{{ 'x'.ljust(1000000000) }}", "a width or count of 1,000,000,000"),
    ("{{ '%999999999d' % 1 }}", "a width or count of 999,999,999"),
    ("{{ '{:>999999999}'.format(1) }}", "a width or count of 999,999,999"),
    ("{{ 2 ** 1000000000 }}", "bits from **"),
    ("{{ ('x' * 10000)|replace('x', 'y' * 10000) }}", "a string of 100,000,000 characters"),
    ("{{ ('x' * 10000).replace('x', 'y' * 10000) }}", "a string of 100,000,000 characters"),
    ("{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}", "output longer than 16,777,216 characters"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a string of 33,554,432 characters"),
])
def test_each_limit_is_a_security_error_naming_the_template(source, message):
    start = time.monotonic()
    with pytest.raises(TemplateSecurityError, match="template hostile: blocked by the sandbox: render limit: ") as err:
        ChatTemplate(source, "hostile").render(MESSAGES)
    assert message in str(err.value)
    assert time.monotonic() - start < 5  # refused before the work, or soon after it starts


def test_render_time_of_one_row_is_bounded(monkeypatch):
    from prefill_kit.templates import sandbox

    monkeypatch.setattr(sandbox.LIMITS, "max_seconds", 0.2)
    slow = ("{% for i in range(100000) %}{% for j in range(9) %}{{ ('x' * 1000).upper()|length }}{% endfor %}"
            "{% endfor %}")  # 900,000 iterations: inside the loop limit, far over 0.2 s
    start = time.monotonic()
    with pytest.raises(TemplateSecurityError, match=r"template slow: .*rendering one row took more than 0.2 s"):
        ChatTemplate(slow, "slow").render(MESSAGES)
    assert time.monotonic() - start < 2


def test_templates_within_the_limits_render_as_before():
    source = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m.content }}{% if loop.last %}!{% endif %}"
              "{% endfor %}{{ 2 ** 10 }}{{ 'ab' * 2 }}{{ '%03d' % 7 }}{{ 'x'|center(5) }}{{ '{:>3}'.format(1) }}"
              "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% else %}none{% endfor %}"
              "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}{{ range(3)|list }}")
    out = ChatTemplate(source, "fine").render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out == "1/2:a2/2:b!1024abab007  x    1a=1empty[0, 1, 2]"


def test_a_render_limit_stops_the_file_render_even_when_skipping_rows(tmp_path, chatml):
    """The template, not a row, is at fault: --on-error skip does not turn it into rejects."""
    import json

    from prefill_kit.prompts.options import RenderOptions
    from prefill_kit.prompts.render_file import render_file

    (tmp_path / "in.jsonl").write_text(json.dumps({"messages": MESSAGES}) + "\n", encoding="utf-8")
    options = RenderOptions(ChatTemplate("{{ 'x' * 300000000 }}", "hostile.jinja"), on_error="skip")
    with pytest.raises(TemplateSecurityError, match=r"in\.jsonl:1: template hostile\.jinja: .*render limit"):
        render_file(tmp_path / "in.jsonl", str(tmp_path / "out.jsonl"), options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
