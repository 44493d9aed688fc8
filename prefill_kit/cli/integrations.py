"""`prefill-kit integrations swift`: where the ms-swift plugin is, and how to launch GRPO with it."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("integrations", help="how to use prefill-kit from another RL framework (ms-swift)",
                       description=__doc__)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    swift = targets.add_parser("swift", help="print the ms-swift plugin's path and an example launch line",
                               description=__doc__)
    swift.add_argument("--prefix", default=r"<think>\n", help=r"response prefix for the example line "
                                                              r"(default: <think>\n, as typed)")
    swift.set_defaults(func=run_swift)
    return p


def plugin_path() -> str:
    """The file ms-swift's --external_plugins takes (found without importing it: it imports ms-swift)."""
    import importlib.util

    return importlib.util.find_spec("prefill_kit.integrations.swift_plugin").origin


def run_swift(args: argparse.Namespace) -> int:
    import shlex

    from prefill_kit.rewards import available_rewards

    path = plugin_path()
    print(f"ms-swift plugin: {path}")
    print(f"reward names: {' '.join('prefill_kit_' + r for r in available_rewards())}")
    print("example (completions from ms-swift already hold the prefix; the plugin scores them whole):")
    print(f"swift rlhf --rlhf_type grpo --model MODEL --dataset DATA.jsonl --external_plugins {shlex.quote(path)} "
          f"--reward_funcs prefill_kit_format prefill_kit_accuracy --response_prefix {shlex.quote(args.prefix)}")
    return 0
