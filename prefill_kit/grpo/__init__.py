"""The GRPO algorithm (`prefill_kit.grpo`): rollout, scoring, advantages, loss and prompt order.

Pure of any training framework: torch and transformers' `generate`, but no accelerate and no TRL, so the
built-in loop, preflight and evaluation share one rollout instead of each keeping a copy.
"""
