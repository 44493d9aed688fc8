"""Adapters that plug prefill-kit into other RL stacks. One module per framework, none imported here:
each is loaded by name (`prefill_kit.integrations.verl`, `...swift_plugin`) only where it is used.

An adapter only translates a call. The render rules live in `prefill_kit.prompts.render` and the scoring rules in
`prefill_kit.rewards`; an adapter never re-implements either.

- `verl`: `compute_score`, verl's custom reward function.
- `verl_export`: a verl RL dataset, chat template and config overrides from chat data.
- `swift_plugin`: ms-swift ORM classes, one per prefill-kit reward (`--external_plugins`).
"""
