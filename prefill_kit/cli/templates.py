"""`prefill-kit templates`: the shipped chat templates and how their generation prompts end."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("templates", help="list the shipped chat templates", description=__doc__)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from prefill_kit.templates import available_templates, load_template

    names = available_templates()
    width = max(map(len, names))
    print(f"{'name':<{width}}  generation prompt ends with")
    for name in names:
        ending = load_template(name).generation_prompt_ending
        print(f"{name:<{width}}  {ending!r}" if ending else f"{name:<{width}}  (no generation prompt: the prompt "
              "ends with the last user turn)")
    return 0
