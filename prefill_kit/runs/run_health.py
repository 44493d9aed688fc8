"""Signs that a GRPO run cannot learn, and what to do about them: one wording for preflight and both backends.

The two usual reasons for "the loss is 0 and nothing learns":
- most completions are truncated (they hit `max_completion_length` before EOS), so they rarely close their
  tags or state an answer and every reward that needs one is 0;
- every completion of a prompt scores the same (zero reward spread), so every group-relative advantage is 0.
Preflight reports both before a run; during a run `HealthMonitor` warns once when either stays above
`THRESHOLD` for `output.logging_steps` steps in a row. Warnings go to the `prefill_kit.runs.run_health` logger, so
the caller (the CLI, a notebook, a test) decides how to show them; unconfigured, Python prints them to stderr.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence

from prefill_kit.wording import count

THRESHOLD = 0.5  # a share above this is a problem worth stopping for
LENGTH_REWARDS = ("soft_overlong", "cosine_length")  # rewards that score length, so truncated completions too
logger = logging.getLogger(__name__)


def percent(share: float) -> str:
    return f"{share:.0%}"


def truncation_advice(rate: float, max_completion_length: int) -> str:
    return (f"{percent(rate)} of completions truncated: raise grpo.max_completion_length (now "
            f"{max_completion_length}) or ask for shorter answers; a truncated completion rarely closes its tags "
            "or states an answer, so its rewards say little")


def length_rewards_in(names: Sequence[str]) -> list[str]:
    """The rewards among `names` that score length: with one, truncation is expected early in a run."""
    return [n for n in names if n in LENGTH_REWARDS]


def truncation_expected(length_rewards: Sequence[str]) -> str:
    """Why truncation does not block a run that has a length reward (preflight's verdict, the backends' warning)."""
    return (f"; not blocking: {', '.join(length_rewards)} scores length and tells these completions apart, so the "
            "run can learn to finish sooner (expected early in the run)")


def zero_spread_advice(share: float) -> str:
    return (f"{percent(share)} of prompt groups have zero reward spread: all completions of a prompt score the "
            "same, so their advantages are 0 and they teach nothing (loss ~0); use rewards that tell completions "
            "apart (a graded reward, partial credit), raise grpo.num_generations or grpo.temperature, or use "
            "prompts the model sometimes gets right")


def zero_spread_share(totals: Sequence[float | None], num_generations: int) -> float:
    """Share of prompt groups (blocks of `num_generations` rows) whose total rewards do not vary: the one rule
    for preflight, the built-in loop's `zero_std_ratio` and the TRL backend's health warning.

    "Does not vary" is TRL's `frac_reward_zero_std`: a standard deviation within 1e-8 of 0. A group with fewer
    than two scorable (non-None) rows has no spread either (its standard deviation is NaN, counted as zero).
    """
    if not totals or len(totals) % num_generations:
        raise ValueError(f"expected a positive multiple of {num_generations} rewards, got {len(totals)}")
    groups = [totals[i:i + num_generations] for i in range(0, len(totals), num_generations)]
    flat = 0
    for group in groups:
        values = [v for v in group if v is not None and not math.isnan(v)]
        if len(values) < 2 or statistics.stdev(values) <= 1e-8:
            flat += 1
    return flat / len(groups)


class HealthMonitor:
    """Warns once per problem when the truncation rate or zero-spread share stays above THRESHOLD.

    Feed it once per optimizer step (or once per rollout with `steps`, the optimizer steps it covers).
    """

    def __init__(self, window: int, max_completion_length: int, reward_names: Sequence[str] = ()):
        self.window = window
        self.max_completion_length = max_completion_length
        self.length_rewards = length_rewards_in(reward_names)
        self.run_length = {"truncation": 0, "zero_spread": 0}
        self.warned: set[str] = set()

    def update(self, step: int, truncated_ratio: float | None, zero_spread_ratio: float | None,
               steps: int = 1) -> list[str]:
        """Record the latest shares; returns the warnings issued now (each problem is warned about once)."""
        expected = truncation_expected(self.length_rewards) if self.length_rewards else ""
        advice = {"truncation": (truncated_ratio, lambda r: truncation_advice(r, self.max_completion_length)
                                 + expected),
                  "zero_spread": (zero_spread_ratio, zero_spread_advice)}
        issued = []
        for name, (value, say) in advice.items():
            above = value is not None and value > THRESHOLD
            self.run_length[name] = self.run_length[name] + steps if above else 0
            if above and self.run_length[name] >= self.window and name not in self.warned:
                self.warned.add(name)
                message = (f"step {step}: {say(value)} (above {percent(THRESHOLD)} for "
                           f"{count(self.run_length[name], 'step')} in a row)")
                logger.warning(message)
                issued.append(message)
        return issued
