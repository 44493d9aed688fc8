"""Multi-turn tool rollouts: sample, call tools, bridge, repeat; then score and lay the samples out for the loss.

Each rollout is a `TrajectoryBuilder` (`prefill_kit.prompts.turns`): token-in-token-out, so its ids are the prompt
ids, then each turn's sampled ids as sampled, each followed by the bridge the template writes (the stop token's
tail, the tool results, the next assistant opening and the prefix). Generation is batched across the rollouts
still live; a rollout ends when a turn makes no tool call, reaches `rollout.max_turns`, or is cut off.

Length: `grpo.max_completion_length` bounds everything after the prompt, sampled ids and bridges together (TRL's
rule). Each turn may sample what is left; a bridge (a tool result) that would pass the bound ends the rollout
instead, and the rollout counts as truncated.

The loss sees only sampled ids: the completion mask is the trajectory's mask after the prompt (0 on every bridge,
tool result and prefix), and a separate attention mask lets the model attend to the bridges it was shown.

`rollout.thinking_history` (templates that rewrite history, e.g. DeepSeek-R1 stripping earlier reasoning):
- `keep`: the rollout is one sample, the ids the model actually continued from. Preflight and `templates audit`
  report that the template would show the model other text.
- `split`: from each turn after a rewrite on, the turn starts a new sample whose prompt is the template's own
  rendering of the conversation before it. Every sample of a rollout gets the rollout's reward and advantage (the
  group statistics are over rollouts, never samples). Loss normalisation then counts samples as sequences: the
  token-level losses (dapo, bnpo, cispo, dr_grpo) weigh each sampled token once, as with `keep`; the
  per-sequence ones (grpo, sapo, luspo) average over samples, so a split rollout counts once per sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from prefill_kit.data.formats import detect_format, row_tools, to_conversation
from prefill_kit.errors import ConfigError, DataError
from prefill_kit.grpo.advantages import combine_rewards
from prefill_kit.grpo.rollout import Rollout, ScoredRollout, left_pad
from prefill_kit.grpo.scoring import WeightedRewardLike, reward_weights, score_completions
from prefill_kit.grpo.tools import ToolConfig, has_response_parser, parse_turn, run_tool_calls
from prefill_kit.prompts.dataset import as_dataset
from prefill_kit.prompts.options import resolve_template
from prefill_kit.prompts.training_data import is_rendered
from prefill_kit.prompts.turns import Trajectory, TrajectoryBuilder, split_turns
from prefill_kit.prompts.turns import _encoder as cached_encoder

# prompts (the ids each live rollout continues from), each one's budget of new tokens -> each one's sampled ids,
# through its first stop id or cut at its budget
Sampler = Callable[[list[list[int]], list[int]], list[list[int]]]


@dataclass
class RolloutResult:
    """One finished rollout: its trajectory, the completion as rewards get it (TRL's conversational form: the
    assistant and tool messages after the prompt, each assistant content starting with its `prefix`), and counts."""

    trajectory: Trajectory
    prompt_length: int
    completion: list[dict[str, Any]]
    truncated: bool
    turns: int
    tool_calls: int
    tool_failures: int

    @property
    def completion_ids(self) -> list[int]:
        return self.trajectory.ids[self.prompt_length:]

    @property
    def sampled_tokens(self) -> int:
        return sum(self.trajectory.mask)


@dataclass
class Timing:
    """Seconds inside the sampler and outside it (parsing, tools, bridges, ids, masks): the benchmark's split."""

    sampling: float = 0.0
    tools: float = 0.0
    total: float = 0.0


def run_rollouts(builders: Sequence[TrajectoryBuilder], sampler: Sampler, *, tokenizer, eos_ids: Sequence[int],
                 tables: Sequence[dict[str, Callable]], schemas: Sequence[list | None], max_turns: int,
                 max_completion_length: int, tool_timeout: float, timing: Timing | None = None
                 ) -> list[RolloutResult]:
    """Run every rollout to its end, sampling the live ones together each turn (module docstring)."""
    start = time.perf_counter()
    eos = set(eos_ids)
    n = len(builders)
    prompt_lengths = [len(b.prompt_ids) for b in builders]
    limit = [p + max_completion_length for p in prompt_lengths]
    completions: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    truncated, turns, calls, failures = [False] * n, [0] * n, [0] * n, [0] * n
    lengths = list(prompt_lengths)
    parser = has_response_parser(tokenizer)  # its parser reads the ids each turn continues from
    live = list(range(n))
    while live:
        budgets = [limit[i] - lengths[i] for i in live]
        t0 = time.perf_counter()
        prompts = [builders[i].prompt_ids for i in live]
        sampled = sampler(prompts, budgets)
        if timing is not None:
            timing.sampling += time.perf_counter() - t0
        still = []
        for i, ids, budget, prompt in zip(live, sampled, budgets, prompts, strict=True):
            ids = _cut(list(ids), eos, budget)
            builder = builders[i]
            message, tool_calls = parse_turn(tokenizer, ids, schemas[i], prompt_ids=builder.prompt_ids if parser
                                             else None, turn_prefix=builder.turn_prefix)
            text = turn_text(tokenizer, prompt[-1], ids)
            prefix = builder.turn_prefix
            builder.add_turn(ids, text, message)
            lengths[i] += len(ids)
            turns[i] += 1
            completions[i].append({**message, "content": prefix + message["content"], "prefix": prefix})
            if not ids or ids[-1] not in eos:
                truncated[i] = True
                continue
            if not tool_calls or turns[i] >= max_turns:
                continue
            t0 = time.perf_counter()
            tool_messages, failed = run_tool_calls(tool_calls, tables[i], tool_timeout)
            if timing is not None:
                timing.tools += time.perf_counter() - t0
            calls[i] += len(tool_calls)
            failures[i] += failed
            bridge = builder.add_messages(tool_messages, limit=limit[i] - 1)  # room for one sampled token
            if bridge is None:
                truncated[i] = True  # the tool result would pass max_completion_length: the rollout ends here
                continue
            completions[i] += tool_messages
            lengths[i] += len(bridge.ids)
            still.append(i)
        live = still
    if timing is not None:
        timing.total += time.perf_counter() - start
    return [RolloutResult(b.result(), prompt_lengths[i], completions[i], truncated[i], turns[i], calls[i],
                          failures[i]) for i, b in enumerate(builders)]


def turn_text(tokenizer, last_prompt_id: int, ids: list[int]) -> str:
    """The text of a sampled turn where it stands: after the prompt's last token. Decoded alone, a Metaspace or
    SentencePiece decoder drops the space its first token opens with (Mistral's ` 5` after `[/INST]` would read
    `5`, and the trajectory's text would no longer be what the model continued); decoded after one token of
    context, the turn is what the decoder adds to that token's text (decoders treat only the first token apart).

    After an added token the turn starts a new segment, where an encoder may write text of its own: a legacy
    SentencePiece normalizer prepends `▁` to every segment, so the template's ` 5.` after `[/INST]` is `▁ ▁5 .`,
    which decodes in context as `  5.` and alone as ` 5.`. Where the two readings differ, the turn's text is the
    one the tokenizer encodes, after that token, to ids that decode as the sampled ids do (the in-context one where
    both do: the tokenizer cannot tell them apart); a turn that neither reading encodes back is a DataError.
    """
    def decode(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    head, both = decode([last_prompt_id]), decode([last_prompt_id, *ids])
    if not both.startswith(head):
        raise DataError(f"the sampled turn does not decode after the prompt's last token {head!r}", field="ids")
    text = both[len(head):]
    if last_prompt_id not in (getattr(tokenizer, "added_tokens_decoder", None) or {}):
        return text
    alone = decode(ids)
    if alone == text:
        return text
    for candidate in (text, alone):
        again = tokenizer(head + candidate, add_special_tokens=False)["input_ids"]
        if again[:1] == [last_prompt_id] and decode(again) == both:
            return candidate
    raise DataError(f"the sampled turn after the added token {head!r} reads {text!r} in context and {alone!r} "
                    "alone, and the tokenizer encodes neither back to it", field="ids")


def _cut(ids: list[int], eos: set[int], budget: int) -> list[int]:
    """Through the first stop id, at most `budget` ids (a sampler may return more: batched generation)."""
    ids = ids[:budget]
    for k, token in enumerate(ids):
        if token in eos:
            return ids[:k + 1]
    return ids


def hf_sampler(model, generation_config, *, pad_token_id: int, autocast=None) -> Sampler:
    """A `Sampler` on a transformers model: the live prompts left-padded into one `generate` call, as many new
    tokens as the largest budget; each row is cut to its own budget and first stop id by `run_rollouts`."""
    import contextlib
    import copy

    def sample(prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        config = copy.copy(generation_config)
        config.max_new_tokens = max(budgets)
        ids, mask = left_pad(prompts, pad_token_id)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (autocast or contextlib.nullcontext)():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
        finally:
            model.train(was_training)
        return out[:, ids.size(1):].tolist()

    return sample


# --- samples for the loss -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One row of the loss: prompt ids, the ids after them, and the loss mask over those (1 on sampled ids)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]


def samples(result: RolloutResult, thinking_history: str, encode: Callable[[str], list[int]]) -> list[Sample]:
    """The loss rows of one rollout: one with `keep`; with `split`, a new one from each turn after a rewrite, its
    prompt the template's own rendering (`encode`d) of the conversation before that turn (module docstring)."""
    traj, p = result.trajectory, result.prompt_length
    starts = split_turns(traj, thinking_history) if traj.turn_starts else [0]
    out = []
    for k, turn in enumerate(starts):
        end = traj.turn_starts[starts[k + 1]] if k + 1 < len(starts) else len(traj.ids)
        if k == 0:
            prompt, begin = traj.ids[:p], p
        else:
            prompt, begin = encode(traj.turn_prompts[turn]), traj.turn_starts[turn]
        out.append(Sample(prompt, traj.ids[begin:end], traj.mask[begin:end]))
    return out


def to_rollout(rows: Sequence[Sample], *, pad_token_id: int, truncated: Sequence[bool]) -> Rollout:
    """The loss's tensors: prompts left-padded, completions right-padded; the completion mask is the loss mask
    (sampled ids only) and `completion_attention_mask` covers every real id, bridges and tool results included."""
    prompt_ids, prompt_mask = left_pad([r.prompt_ids for r in rows], pad_token_id)
    completions = [torch.tensor(r.completion_ids, dtype=torch.long) for r in rows]
    completion_ids = pad_sequence(completions, batch_first=True, padding_value=pad_token_id)
    completion_mask = pad_sequence([torch.tensor(r.completion_mask, dtype=torch.long) for r in rows],
                                   batch_first=True, padding_value=0)
    attention = pad_sequence([torch.ones_like(c) for c in completions], batch_first=True, padding_value=0)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.tensor(list(truncated)),
                   completion_attention_mask=attention)


@dataclass
class MultiTurnScored(ScoredRollout):
    """A `ScoredRollout` of multi-turn rollouts: one entry per rollout, but `batch` holds one row per sample, and
    `owners[s]` is the rollout (index into the entries) sample `s` belongs to, whose advantage it takes."""

    owners: list[int] = field(default_factory=list)
    results: list[RolloutResult] = field(default_factory=list)


@dataclass
class EnvironmentReward:
    """An environment's `get_reward()` as a reward (TRL: named after its class, weight 1). A `get_reward` that
    raises is None for that rollout: a reward never stops a run."""

    name: str
    weight: float = 1.0

    def fn(self, environments=None, **_: Any) -> list[float | None]:
        out = []
        for env in environments or []:
            try:
                out.append(env.get_reward())
            except Exception:  # noqa: BLE001 - user code scoring model output
                out.append(None)
        return out


def sample_advantages(advantages: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
    """Each sample's advantage: its rollout's (`owners[s]`), for every sample of a split rollout alike: (B,) -> (S,)."""
    return advantages[torch.as_tensor(list(owners), dtype=torch.long)]


def sample_and_score_turns(builders: Sequence[TrajectoryBuilder], sampler: Sampler, *, rows: dict[str, list[Any]],
                           prompts: list[Any], rewards: Sequence[WeightedRewardLike], tokenizer,
                           eos_ids: Sequence[int], tools: ToolConfig, environments: list[Any] | None,
                           schemas: Sequence[list | None], max_turns: int, max_completion_length: int,
                           thinking_history: str, timing: Timing | None = None) -> MultiTurnScored:
    """Run the rollouts (one builder per completion, a prompt's adjacent), score them with TRL's conversational
    call (`completions` as message lists, plus `prefix`, `completion_ids`, every column, and `environments`), and
    lay out their samples."""
    tables = [tools.tool_table(environments[i] if environments else None) for i in range(len(builders))]
    results = run_rollouts(builders, sampler, tokenizer=tokenizer, eos_ids=eos_ids, tables=tables, schemas=schemas,
                           max_turns=max_turns, max_completion_length=max_completion_length,
                           tool_timeout=tools.timeout, timing=timing)
    columns = dict(rows)
    columns["prefix"] = [r.trajectory.prefix for r in results]
    if environments:
        columns["environments"] = environments
    completion_ids = [r.completion_ids for r in results]
    scores = score_completions(rewards, prompts=prompts, completions=[r.completion for r in results],
                               completion_ids=completion_ids, columns=columns)
    columns.pop("environments", None)
    encode = _encoder(tokenizer)
    rows_out, owners = [], []
    for i, r in enumerate(results):
        for s in samples(r, thinking_history, encode):
            rows_out.append(s)
            owners.append(i)
    batch = to_rollout(rows_out, pad_token_id=tokenizer.pad_token_id,
                       truncated=[results[o].truncated for o in owners])
    texts = [_after_prompt(r) for r in results]
    return MultiTurnScored(batch=batch, completion_ids=completion_ids, completions=texts,
                           lengths=[r.sampled_tokens for r in results], truncated=[r.truncated for r in results],
                           prompts=prompts, columns=columns, scores=scores,
                           totals=combine_rewards(scores, reward_weights(rewards)), owners=owners, results=results)


def _after_prompt(result: RolloutResult) -> str:
    traj = result.trajectory
    return traj.text[len(traj.turn_prompts[0]):] if traj.turn_prompts else ""


def _encoder(tokenizer) -> Callable[[str], list[int]]:
    encoder = cached_encoder(tokenizer)
    return lambda text: encoder.encode([text])[0]


def metrics(results: Sequence[RolloutResult]) -> dict[str, float]:
    """`turns/mean`, `tools/calls`, `tools/failures` of one process's rollouts (the loop gathers them)."""
    n = max(1, len(results))
    return {"turns/mean": sum(r.turns for r in results) / n, "tools/calls": float(sum(r.tool_calls for r in results)),
            "tools/failures": float(sum(r.tool_failures for r in results))}


def metrics_of_all_processes(results: Sequence[RolloutResult], accelerator) -> dict[str, float]:
    """`metrics` over every process's rollouts: `turns/mean` over all of them, tool calls and failures summed."""
    local = metrics(results)
    summed = accelerator.reduce(torch.tensor(
        [local["turns/mean"] * len(results), local["tools/calls"], local["tools/failures"], len(results)],
        device=accelerator.device, dtype=torch.float32), reduction="sum").tolist()
    return {"turns/mean": summed[0] / max(1.0, summed[3]), "tools/calls": summed[1], "tools/failures": summed[2]}


# --- what the training loop calls ---------------------------------------------------------------------------


class MultiTurnRollouts:
    """The training loop's multi-turn rollout: the data's conversations, the tools, and the template, loaded once.

    `__call__` samples `num_generations` rollouts of each prompt, one environment instance each (`reset(**row)`
    with the data row; text it returns is appended to the last user message, TRL's rule), and scores them.
    """

    def __init__(self, config, tokenizer, tools: ToolConfig):
        data = config.data
        raw = as_dataset(str(data.path))
        if is_rendered(raw):
            raise ConfigError(f"rollout: {data.path} is already rendered; multi-turn rollouts render each turn "
                              "themselves and need the raw conversations (messages, or prompt/question columns)")
        if data.few_shot is not None:
            raise ConfigError("data.few_shot: not supported with rollout.tools / rollout.environment yet")
        fmt = data.format if data.format != "auto" else detect_format(raw.column_names)
        self.rows = [dict(row) for row in raw]
        self.conversations = [to_conversation(row, fmt).messages for row in self.rows]
        self.row_schemas = [row_tools(row) or [] for row in self.rows]
        self.template = resolve_template(data.template, tokenizer)
        self.tokenizer, self.tools, self.config = tokenizer, tools, config

    def start(self, row_indices: Sequence[int]) -> tuple[list[TrajectoryBuilder], list[list | None], list[Any],
                                                       list[Any] | None]:
        """One rollout per entry of `row_indices` (a data row each, repeated for its generations): the builders,
        each one's tool schemas, its prompt (the conversation after `reset`) and its environment (None without)."""
        config = self.config
        environments = self.tools.environments(len(row_indices))
        builders, schemas, prompts = [], [], []
        for j, index in enumerate(row_indices):
            messages = [dict(m) for m in self.conversations[index]]
            if environments is not None:
                observation = environments[j].reset(**self.rows[index])
                if observation is not None:
                    messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
            schema = [*self.row_schemas[index], *self.tools.schemas] or None
            builders.append(TrajectoryBuilder(messages, self.template, self.tokenizer, prefix=config.data.prefix,
                                              template_kwargs=dict(config.data.template_kwargs), tools=schema))
            schemas.append(schema)
            prompts.append(messages)
        return builders, schemas, prompts, environments

    def __call__(self, policy, rows: dict[str, list[Any]], indices: list[int], *, rewards, num_generations: int,
                 generation_config, eos_ids, autocast=None, timing: Timing | None = None) -> MultiTurnScored:
        config = self.config
        builders, schemas, prompts, environments = self.start([i for i in indices for _ in range(num_generations)])
        skip = {"prompt", "prompt_ids", "num_prompt_tokens", "prefix"}
        columns = {k: [v for v in values for _ in range(num_generations)] for k, values in rows.items()
                   if k not in skip}
        sampler = hf_sampler(policy, generation_config, pad_token_id=self.tokenizer.pad_token_id, autocast=autocast)
        scored = sample_and_score_turns(
            builders, sampler, rows=columns, prompts=prompts, rewards=rewards, tokenizer=self.tokenizer,
            eos_ids=eos_ids, tools=self.tools, environments=environments, schemas=schemas,
            max_turns=config.rollout.max_turns, max_completion_length=config.grpo.max_completion_length,
            thinking_history=config.rollout.thinking_history, timing=timing)
        if config.grpo.mask_truncated_completions:
            scored.batch.completion_mask *= (~scored.batch.is_truncated).unsqueeze(1).long()
        return scored


def turn_log(result: RolloutResult) -> list[dict[str, Any]]:
    """Each turn of a rollout for completions.jsonl: assistant turns with their prefix, the content the model
    wrote after it, its tool calls and how many of its tokens were trained; tool messages as they came back."""
    traj, out, k = result.trajectory, [], 0
    starts = [*traj.turn_starts, len(traj.ids)]
    for message in result.completion:
        if message["role"] == "assistant":
            entry = {"role": "assistant", "prefix": message["prefix"],
                     "content": message["content"][len(message["prefix"]):],
                     "trained_tokens": sum(traj.mask[starts[k]:starts[k + 1]])}
            if message.get("tool_calls"):
                entry["tool_calls"] = message["tool_calls"]
            out.append(entry)
            k += 1
        else:
            out.append({"role": message["role"], "name": message.get("name"), "content": message["content"]})
    return out
