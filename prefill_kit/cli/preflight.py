"""`prefill-kit preflight CONFIG`: what a training run will do, before it runs.

Checks the config for the chosen backend, renders the data, samples `grpo.num_generations` completions for a
few of the prompts the run starts with (configured model and sampling), scores them with the configured
rewards, and reports prompt lengths, truncation, reward statistics, zero-spread groups, prefix token merges,
the prefix as the model sees it and sample completions, with a verdict and advice. It trains nothing.
With rollout.tools / rollout.environment it samples the multi-turn tool rollouts training runs, and reports
turns, tool calls and failed calls by kind, and whether the template renders the rollouts append-only.

Exit codes: 0, or 1 with --strict when a blocking problem was found; 2 for a config error.
"""

from __future__ import annotations

import argparse
import sys

from prefill_kit.cli.args import positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("preflight", help="sample and score a few completions to check a training config",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML training config (as for `prefill-kit train`)")
    p.add_argument("--backend", choices=("builtin", "trl"), help="the backend to check for (default: the config's)")
    p.add_argument("--prompts", type=positive_int, default=8, metavar="N", help="prompts to sample (default: 8)")
    p.add_argument("--samples", type=int, default=4, metavar="K", help="sample completions to show (default: 4)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a blocking problem is found")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for `prefill-kit train`; repeatable")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="highlight the prefix in samples (auto: when stdout is a terminal)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import os

    from prefill_kit.config import load_config
    from prefill_kit.extras import require_train

    require_train("prefill-kit preflight", ("torch", "accelerate", "trl"))
    from prefill_kit.runs.preflight import run_preflight

    overrides = list(args.overrides) + ([f"backend={args.backend}"] if args.backend else [])
    config = load_config(args.config, overrides)  # config errors come here, before any model is loaded
    if os.getcwd() not in sys.path:  # as `prefill-kit train` does, for `module:function` rewards
        sys.path.insert(0, os.getcwd())
    from prefill_kit.runs.checks import check_rewards_of

    check_rewards_of(args.config, config.rewards)
    from prefill_kit.cli.quiet import library_chatter_off

    with library_chatter_off():
        report = run_preflight(config, num_prompts=args.prompts, num_samples=args.samples)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(report_as_text(report, color=color))
    return 1 if args.strict and report.blocking else 0


def report_as_text(report, *, color: bool = False) -> str:
    """The report as text: facts first, then samples, then the verdict with its advice."""
    from prefill_kit.runs.inspect import rows_as_text, show
    from prefill_kit.runs.run_health import percent

    r = report
    low, mean, high = r.prompt_tokens
    lines = [f"preflight: {r.backend} backend, model {r.model}: {r.num_prompts} prompt(s) x {r.num_generations} "
             f"completions, at most {r.max_completion_length} tokens each", ""]
    context = f"context {r.context_length} tokens" if r.context_length else "context unknown"
    over = (f"{len(r.over_long)} over-long (prompt + {r.max_completion_length} completion tokens > context): rows "
            + ", ".join(map(str, r.over_long[:10])) + (", ..." if len(r.over_long) > 10 else "")
            if r.over_long else "none over-long")
    lines.append(f"prompts:     {r.num_rows} rows, {low}-{high} tokens (mean {mean:.1f}); {context}; {over}")
    pieces = " ".join(repr(t) for t in r.prefix_tokens)
    lines.append(f"prefix:      {r.prefix!r} as the model sees it: {len(r.prefix_tokens)} token(s) {pieces}"
                 if r.prefix else "prefix:      none")
    merges = (f"merges with the text before it in {len(r.boundary_merges)} of {r.boundary_rows_checked} rows"
              if r.boundary_merges else f"no merges in {r.boundary_rows_checked} rows")
    lines.append(f"boundary:    {merges}")
    if r.few_shot_examples:
        scores = ", ".join(f"{show(name)} {mean:.3f}" for name, mean in r.few_shot_format.items())
        lines.append(f"few-shot:    {r.few_shot_examples} examples; their format reward: {scores or 'none configured'}")
    if r.merge_example is not None:
        lines.append(f"             {r.merge_example.where}: prompt tokens {r.merge_example.whole} vs text + prefix "
                     f"{r.merge_example.split}")
    lines.append(f"truncation:  {percent(r.truncation_rate)} of completions reached {r.max_completion_length} tokens "
                 "without EOS")
    lines.append(f"zero spread: {percent(r.zero_spread_share)} of prompt groups (all completions scored the same)")
    if r.multi_turn is not None:
        lines += _multi_turn_lines(r.multi_turn)
    lines += ["", "rewards:", f"  {'name':<24} {'weight':>6} {'mean':>8} {'std':>8} {'None':>6}"]
    for s in [*r.rewards, r.total]:
        weight = "" if s is r.total else f"{s.weight:g}"
        lines.append(f"  {show(s.name):<24} {weight:>6} {_num(s.mean):>8} {_num(s.std):>8} "
                     f"{percent(s.none_share):>6}")
    if r.samples:
        lines += ["", "samples (the prefix between « and » is the model's, not generated):" if not color
                  else "samples (the highlighted prefix is the model's, not generated):"]
        lines.append(rows_as_text(r.samples, [s.name for s in r.rewards], color=color))
    lines.append("")
    if r.ready:
        lines.append("verdict: ready" + (" (with warnings)" if r.problems else ": no problems found"))
    else:
        lines.append(f"verdict: NOT READY, {len(r.blocking)} blocking problem(s)")
    for p in r.problems:
        lines.append(f"  {'✗' if p.severity == 'blocking' else '!'} {p.message}")
    return "\n".join(lines)


def _multi_turn_lines(m) -> list[str]:
    """Turns, tool calls and failures of the sampled rollouts; append-only status (the audit's probe, then what
    the rollouts met); the loss rows `thinking_history` makes of them."""
    kinds = ", ".join(f"{count} {kind}" for kind, count in m.failure_kinds.items())
    audit = m.audit

    def status(bridge, error: str | None = None) -> str:
        if bridge is None:
            return f"refused ({error})" if error else "-"
        return "yes" if bridge.rewrites is None else f"no, {bridge.rewrites.describe()}"

    seen = (f"rewrites in {len(m.rewritten)} of {m.rollouts}" if m.rewritten
            else f"no rewrite in {m.rollouts}")
    low, mean, high = m.prompt_tokens
    return [f"rollouts:    {m.rollouts}, prompts (with the tools' schemas) {low}-{high} tokens (mean {mean:.1f})",
            f"turns:       {m.turns_mean:.2f} per rollout on average (rollout.max_turns {m.max_turns})",
            f"tool calls:  {m.tool_calls}, {m.tool_failures} failed" + (f" ({kinds})" if kinds else ""),
            f"append-only: after a tool turn: {status(audit.tool_bridge, audit.tool_error)}; after a user turn: "
            f"{status(audit.user_bridge)} (template {audit.name}, probed); sampled rollouts: {seen}",
            f"history:     rollout.thinking_history {m.thinking_history}: {m.loss_samples} loss row(s) from "
            f"{m.rollouts} rollouts"]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
