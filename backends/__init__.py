"""Training backends (`prefill_kit.backends`): `builtin` (a readable GRPO loop) and `trl` (an adapter)."""
