"""`prefill-kit templates`: the shipped chat templates and how their generation prompts end;
`prefill-kit templates audit`: what each does to a multi-turn rollout (bridges, stop tokens, rewrites)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("templates", help="list the shipped chat templates, or audit them for multi-turn rollouts",
                       description=__doc__)
    p.set_defaults(func=run)
    audit = p.add_subparsers(dest="templates_command", metavar="audit").add_parser(
        "audit", help="audit templates for multi-turn rollouts (a Markdown table)",
        description="For each template: what the generation prompt already writes, the stop token ending an "
                    "assistant turn and what follows it, whether rendering is append-only across user, tool and "
                    "assistant turns (and which turn it rewrites where not), the bridges after a tool turn and a "
                    "user turn, and with --tokenizer whether the prefix and bridges are token-stable.")
    audit.add_argument("specs", nargs="*", metavar="SPEC",
                       help="template specs (shipped name, .jinja file, model directory); default: every shipped one")
    audit.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory: adds the token-stability check")
    audit.add_argument("--prefix", default="", help=r"response prefix, e.g. '<think>\n' (escapes decoded)")
    audit.add_argument("--strict", action="store_true", help="exit 1 when some template is not append-only")
    audit.set_defaults(func=run_audit)
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


def run_audit(args: argparse.Namespace) -> int:
    from prefill_kit.prompts.options import load_tokenizer, resolve_template
    from prefill_kit.prompts.render import decode_escapes
    from prefill_kit.prompts.template_audit import audit_table, audit_template
    from prefill_kit.templates import available_templates

    tokenizer = load_tokenizer(args.tokenizer)
    audits = [audit_template(resolve_template(spec, tokenizer), prefix=decode_escapes(args.prefix),
                             tokenizer=tokenizer) for spec in args.specs or available_templates()]
    print(audit_table(audits))
    return 1 if args.strict and not all(a.append_only for a in audits) else 0
