"""The built-in GRPO backend (`prefill_kit.backends.builtin`): a readable, accelerate-based loop.

- `compute_advantages`, `combine_rewards` (advantages.py): rewards to group-relative advantages.
- `grpo_loss`, `token_logps` (loss.py): TRL 1.16's loss family (clipped, GSPO, cispo, sapo, luspo), the KL term,
  the loss-type normalizers.
- `generate`, `completion_logps` (rollout.py): sampling and scoring of completion tokens.
- `train(config)` (loop.py): the loop. Every backend module exposes `train(config)` with this meaning.
"""

from prefill_kit.backends.builtin.loop import RolloutRecord, TrainResult, train
from prefill_kit.grpo.advantages import combine_rewards, compute_advantages
from prefill_kit.grpo.loss import NORMALIZERS, grpo_loss, token_logps
from prefill_kit.grpo.rollout import Rollout, completion_logps, completion_mask_from_eos, generate

__all__ = ["NORMALIZERS", "Rollout", "RolloutRecord", "TrainResult", "combine_rewards", "completion_logps",
           "completion_mask_from_eos", "compute_advantages", "generate", "grpo_loss", "token_logps", "train"]
