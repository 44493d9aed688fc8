"""`prefill-kit integrations swift`: where the ms-swift plugin is, and how to launch GRPO with it."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("integrations", help="how to use prefill-kit from another RL framework (ms-swift)",
                       description=__doc__)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    swift = targets.add_parser("swift", help="print the ms-swift plugin's path and an example launch line",
                               description=__doc__)
    swift.add_argument("--prefix", default=r"<think>\n", help=r"response prefix for the launch line "
                                                              r"(default: <think>\n, as typed)")
    swift.add_argument("--model", default="MODEL", help="model for the launch line (default: MODEL)")
    swift.add_argument("--dataset", default="DATA.jsonl", help="dataset for the launch line (default: DATA.jsonl)")
    swift.add_argument("--rewards", default="format,accuracy",
                       help="prefill-kit rewards and weights, as for `prefill-kit reward` (default: format,accuracy)")
    swift.set_defaults(func=run_swift)
    return p


def plugin_path() -> str:
    """The file ms-swift's --external_plugins takes (found without importing it: it imports ms-swift)."""
    import importlib.util

    return importlib.util.find_spec("prefill_kit.integrations.swift_plugin").origin


def swift_launch_words(model: str, dataset: str, rewards: str, prefix: str) -> list[str]:
    """`swift rlhf` GRPO arguments that score with the plugin: `rewards` (a spec such as "format,accuracy:2") as
    `--reward_funcs` and `--reward_weights`, `prefix` as typed (ms-swift decodes `\\n` itself)."""
    from prefill_kit.errors import ConfigError
    from prefill_kit.rewards import available_rewards, parse_reward_spec

    spec = parse_reward_spec(rewards)
    unknown = [r.name for r in spec if r.name not in available_rewards()]
    if unknown:
        raise ConfigError(f"--rewards: {unknown} are not prefill-kit rewards; the ms-swift plugin registers only "
                          f"these: {', '.join(available_rewards())}")
    words = ["swift", "rlhf", "--rlhf_type", "grpo", "--model", model, "--dataset", dataset,
             "--external_plugins", plugin_path(), "--reward_funcs", *(f"prefill_kit_{r.name}" for r in spec)]
    if any(r.weight != 1.0 for r in spec):
        words += ["--reward_weights", *(f"{r.weight:g}" for r in spec)]
    return [*words, "--response_prefix", prefix]


def run_swift(args: argparse.Namespace) -> int:
    import shlex

    from prefill_kit.rewards import available_rewards

    words = swift_launch_words(args.model, args.dataset, args.rewards, args.prefix)
    print(f"ms-swift plugin: {plugin_path()}")
    print(f"reward names: {' '.join('prefill_kit_' + r for r in available_rewards())}")
    print("launch (completions from ms-swift already hold the prefix; the plugin scores them whole):")
    print(shlex.join(words))
    return 0
