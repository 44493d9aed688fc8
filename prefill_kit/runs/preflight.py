"""Preflight: what a GRPO run will do, found out in a minute instead of after hours on a GPU.

`run_preflight(config)` checks the config against the chosen backend, renders the data, samples
`num_generations` completions for a few of the prompts the run would start with (the built-in rollout code,
with the configured model and sampling), scores them with the configured rewards, and returns a
`PreflightReport`: prompt lengths, truncation, each reward's statistics, zero-spread groups, prefix token
merges, the prefix as the model sees it, sample completions, and the problems found, each with advice.
It trains nothing and prints nothing but a progress bar; `prefill-kit preflight` shows the report.

A multi-turn run (`rollout.tools` / `rollout.environment`) samples the training loop's own multi-turn rollouts
(`grpo.multiturn.MultiTurnRollouts`), and the report gains a `MultiTurnSummary`: turns, tool calls, failed calls by
kind, and whether the template renders the conversation append-only: `templates audit`'s probe with this config's
prefix, and the rewrites the sampled rollouts met. With `rollout.thinking_history: keep`, a template that rewrites
history after a tool turn is a warning: the trajectory differs from what the template would show the model.
"""

from __future__ import annotations

import ast
import functools
import re
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prefill_kit.config import TrainingConfig
from prefill_kit.errors import ConfigError, PrefillKitError
from prefill_kit.grpo.advantages import compute_advantages
from prefill_kit.grpo.multiturn import MultiTurnRollouts, RolloutResult, metrics, turn_log
from prefill_kit.grpo.policy import load_model, load_tokenizer
from prefill_kit.grpo.prompt_order import prompt_indices
from prefill_kit.grpo.rollout import eos_token_ids, make_generation_config, sample_and_score
from prefill_kit.grpo.scoring import nullable
from prefill_kit.prompts.template_audit import TemplateAudit, audit_template
from prefill_kit.prompts.tokens import PromptTokenizer, boundary_merges, describe_merge, exact_ids_tokenizer
from prefill_kit.prompts.training_data import few_shot_examples, load_training_data
from prefill_kit.runs.checks import check_paths, run_rewards, run_tools
from prefill_kit.runs.completion_log import check_reward_names, completion_rows
from prefill_kit.runs.prefix_fit import format_rewards, prefix_length_problem, solution_format_problems
from prefill_kit.runs.run_health import (
    LENGTH_REWARDS,
    THRESHOLD,
    percent,
    truncation_advice,
    truncation_expected,
    zero_spread_advice,
    zero_spread_share,
)
from prefill_kit.runs.trackers import check_trackers
from prefill_kit.runs.trl_config import check_prompt_ids, grpo_config_kwargs, trl_extra_kwargs

BOUNDARY_ROWS = 1000  # rows whose prefix boundary is audited (a template merges the same way on every row)
TRUNCATION_NOTICE = 0.25  # a truncation rate worth a (non-blocking) warning
THINK_REWARDS = ("format", "think_format", "tag_count")  # rewards that need the reasoning block closed


@dataclass
class Problem:
    """Something that would make the run learn badly or not at all; `blocking` ones fail `--strict`."""

    severity: Literal["blocking", "warning"]
    message: str


@dataclass
class RewardSummary:
    name: str
    weight: float
    mean: float | None  # over the completions it scored (None: it scored none)
    std: float | None  # Bessel-corrected, as the training logs report it
    none_share: float  # share of completions it returned None for
    constant: float | None  # the value, when it gave every scored completion the same one


@dataclass
class MultiTurnSummary:
    """What the sampled multi-turn rollouts did, and whether the template renders them append-only."""

    rollouts: int
    prompt_tokens: tuple[int, float, int]  # min, mean, max over the rollouts' prompts (tool schemas, reset text)
    max_turns: int
    turns_mean: float  # assistant turns per rollout
    tool_calls: int
    tool_failures: int
    failure_kinds: dict[str, int]  # "unknown tool", "malformed call", "timed out", "raised <Error>" -> calls
    loss_samples: int  # the loss rows these rollouts make: one per rollout with keep, more with split
    thinking_history: str
    audit: TemplateAudit  # `templates audit`'s probe of the template, with this config's prefix
    rewritten: list[tuple[int, int, Any]]  # (rollout, bridge, `turns.Rewrite`), 0-based: the first rewrite of each
    # sampled rollout whose template rendered an earlier turn differently once the conversation went on

    @property
    def append_only(self) -> bool:
        """After tool turns, the turns these rollouts add: by the probe and in every sampled rollout."""
        return not self.rewritten and (self.audit.tool_bridge is None or self.audit.tool_bridge.rewrites is None)


@dataclass
class PreflightReport:
    backend: str
    model: str
    num_rows: int  # training rows after rendering
    prompt_tokens: tuple[int, float, int]  # min, mean, max over all rows
    context_length: int | None  # the model's max_position_embeddings
    over_long: list[int]  # rows whose prompt + max_completion_length exceeds the context
    num_prompts: int
    num_generations: int
    max_completion_length: int
    truncation_rate: float
    rewards: list[RewardSummary]
    total: RewardSummary  # the weighted total reward
    zero_spread_share: float
    boundary_rows_checked: int
    boundary_merges: list[int]  # rows whose prefix merges with the text before it
    merge_example: Any  # a `tokens.BoundaryMerge` for the first such row, or None
    prefix: str  # the effective prefix of the first sampled prompt
    prefix_tokens: list[str]  # the prompt's last tokens that hold it, each decoded: what the model conditions on
    samples: list[dict[str, Any]]  # completion rows (completion_log schema, step 0)
    problems: list[Problem] = field(default_factory=list)
    few_shot_format: dict[str, float] = field(default_factory=dict)  # format reward -> mean over the examples
    few_shot_examples: int = 0  # worked examples in data.few_shot (0: none configured)
    multi_turn: MultiTurnSummary | None = None  # rollout.tools / rollout.environment runs only

    @property
    def blocking(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "blocking"]

    @property
    def ready(self) -> bool:
        return not self.blocking


def check_backend_options(config: TrainingConfig, backend: str) -> None:
    """Raise ConfigError for an option `backend` does not support, as training would, before any model loads."""
    check_trackers(config.output.report_to)
    if backend == "builtin":
        if config.trl:
            raise ConfigError(f"trl.{next(iter(config.trl))}: an option of the trl backend; the builtin backend "
                              "does not support it (remove it, or use --backend trl)")
        return
    if backend != "trl":
        raise ConfigError(f"backend: expected builtin or trl, got {backend!r}")
    from trl import GRPOConfig

    extra = trl_extra_kwargs(config)

    try:  # TRL's own checks of the combination (batch sizes, generation settings, ...)
        with warnings.catch_warnings():  # transformers' deprecation notes about its own defaults
            warnings.simplefilter("ignore", FutureWarning)
            GRPOConfig(**grpo_config_kwargs(config), **extra)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"backend trl: TRL's GRPOConfig rejects this config: {exc}") from None


def run_preflight(config: TrainingConfig, *, backend: str | None = None, num_prompts: int = 8,
                  num_samples: int = 4, progress: bool = True, reward_funcs: Sequence[Any] | None = None
                  ) -> PreflightReport:
    """Check `config` by sampling and scoring completions for `num_prompts` prompts; see the module docstring.

    Raises ConfigError for a config the backend would reject, before loading any model. `reward_funcs`
    (objects with `name`, `fn`, `weight`) replace `config.rewards` when given.
    """
    import torch
    from tqdm.auto import tqdm

    backend = backend or config.backend
    check_backend_options(config, backend)
    check_paths(config)
    if num_prompts < 1:
        raise ConfigError(f"prompts: expected a positive number, got {num_prompts}")
    tools, rewards = run_tools(config, run_rewards(config, reward_funcs))
    check_reward_names([r.name for r in rewards])
    g = config.grpo

    tokenizer = load_tokenizer(config)
    dataset = load_training_data(config.data, tokenizer)
    multi_turn = MultiTurnRollouts(config, tokenizer, tools) if tools is not None else None
    problems: list[Problem] = []
    if backend == "trl":
        problems += _trl_prompt_problems(tokenizer, dataset)
    model = load_model(config)  # the model as training starts: with model.lora, base + a fresh adapter
    model.eval()

    # ---- prompts: lengths over every row, the prefix boundary on the first BOUNDARY_ROWS
    lengths = list(dataset["num_prompt_tokens"])
    context = getattr(model.config, "max_position_embeddings", None)
    over_long = [i for i, n in enumerate(lengths) if context and n + g.max_completion_length > context]
    checked = dataset.select(range(min(BOUNDARY_ROWS, len(dataset))))
    merges, merge_example = _boundary_merges(tokenizer, checked)

    # ---- sample and score completions for the prompts the run starts with (the built-in loop's rollout)
    n = min(num_prompts, len(dataset))
    indices = prompt_indices(0, num_prompts=len(dataset), prompts_per_process=n, process_index=0, num_processes=1,
                             seed=config.train.seed, shuffle=config.data.shuffle)
    rows = dataset[indices]
    torch.manual_seed(config.train.seed)
    eos_ids = eos_token_ids(tokenizer, model)
    autocast = functools.partial(torch.autocast, model.device.type, dtype=torch.bfloat16, enabled=config.train.bf16)
    generation_config = make_generation_config(g, tokenizer, eos_ids)
    chunk = max(1, config.train.per_device_train_batch_size // g.num_generations)  # prompts sampled together
    with tqdm(total=n, desc="preflight: generating", unit="prompt", file=sys.stderr, disable=not progress) as bar:
        if multi_turn is None:
            parts = [sample_and_score(
                model, rows, rewards=rewards, tokenizer=tokenizer, num_generations=g.num_generations,
                generation_config=generation_config, eos_ids=eos_ids, chunk=chunk, autocast=autocast,
                on_chunk=bar.update)]
        else:  # the training loop's multi-turn rollout, `chunk` prompts at a time
            parts = []
            for start in range(0, n, chunk):
                some = indices[start:start + chunk]
                parts.append(multi_turn(model, dataset[some], some, rewards=rewards,
                                        num_generations=g.num_generations, generation_config=generation_config,
                                        eos_ids=eos_ids, autocast=autocast))
                bar.update(len(some))
    completions = [c for p in parts for c in p.completions]
    prefixes = [c for p in parts for c in p.columns["prefix"]]
    truncated = [t for p in parts for t in p.truncated]
    completion_lengths = [k for p in parts for k in p.lengths]
    scores, totals = torch.cat([p.scores for p in parts]), torch.cat([p.totals for p in parts])
    results: list[RolloutResult] = [r for p in parts for r in getattr(p, "results", [])]
    advantages = compute_advantages(totals, g.num_generations, g.scale_rewards)

    summaries = [_summary(r.name, float(r.weight), nullable(scores[:, k])) for k, r in enumerate(rewards)]
    total_list = nullable(totals)
    total = _summary("reward", 1.0, total_list)
    truncation_rate = sum(truncated) / len(truncated)
    zero_spread = zero_spread_share(total_list, g.num_generations)
    samples = completion_rows(
        step=0, prompt_indices=[i for i in indices for _ in range(g.num_generations)], prefixes=prefixes,
        completions=completions, completion_lengths=completion_lengths, truncated=truncated,
        rewards={r.name: scores[:, k].tolist() for k, r in enumerate(rewards)}, reward=totals.tolist(),
        advantages=advantages.tolist(), turns=[turn_log(r) for r in results] if results else None)[:num_samples]

    problems += _problems(
        g=g, num_rows=len(dataset), over_long=over_long, context=context, truncation_rate=truncation_rate,
        summaries=summaries, zero_spread=zero_spread, merges=merges, checked=len(checked),
        merge_example=merge_example, prefix=prefixes[0], completions=completions)
    summary = None
    if multi_turn is not None:
        summary = multi_turn_summary(results, sum(len(p.owners) for p in parts), config, multi_turn.template,
                                     tokenizer)
        problems += multi_turn_problems(summary, context, g.max_completion_length)
    few_shot = few_shot_examples(config.data)
    few_shot_format = _few_shot_format(few_shot, rewards)
    problems += _fit_problems(tokenizer, checked, rewards, g.max_completion_length, few_shot_format)
    prompt = results[0].trajectory.ids[:results[0].prompt_length] if results else rows["prompt_ids"][0]
    return PreflightReport(
        backend=backend, model=config.model.path, num_rows=len(dataset),
        prompt_tokens=(min(lengths), statistics.fmean(lengths), max(lengths)), context_length=context,
        over_long=over_long, num_prompts=n, num_generations=g.num_generations,
        max_completion_length=g.max_completion_length, truncation_rate=truncation_rate, rewards=summaries,
        total=total, zero_spread_share=zero_spread, boundary_rows_checked=len(checked), boundary_merges=merges,
        merge_example=merge_example, prefix=prefixes[0], prefix_tokens=prefix_tokens(tokenizer, prompt, prefixes[0]),
        samples=samples, problems=problems, few_shot_format=few_shot_format,
        few_shot_examples=len(few_shot.examples) if few_shot is not None else 0, multi_turn=summary)


# --- multi-turn rollouts ------------------------------------------------------------------------------------


def multi_turn_summary(results: Sequence[RolloutResult], loss_samples: int, config: TrainingConfig, template,
                       tokenizer) -> MultiTurnSummary:
    """The figures of the sampled rollouts (`multiturn.metrics`), their failed calls by kind, their rewrites, and
    `templates audit`'s probe of the template with this config's prefix and template options."""
    figures = metrics(results)
    lengths = [r.prompt_length for r in results]
    audit = audit_template(template, prefix=config.data.prefix, tokenizer=tokenizer,
                           template_kwargs=dict(config.data.template_kwargs))
    rewritten = []
    for i, r in enumerate(results):
        first = next(((k, b.rewrites) for k, b in enumerate(r.trajectory.bridges) if b.rewrites is not None), None)
        if first is not None:
            rewritten.append((i, *first))
    return MultiTurnSummary(
        rollouts=len(results), prompt_tokens=(min(lengths), statistics.fmean(lengths), max(lengths)),
        max_turns=config.rollout.max_turns, turns_mean=figures["turns/mean"],
        tool_calls=int(figures["tools/calls"]), tool_failures=int(figures["tools/failures"]),
        failure_kinds=failure_kinds(results), loss_samples=loss_samples,
        thinking_history=config.rollout.thinking_history, audit=audit, rewritten=rewritten)


_UNKNOWN = re.compile(r"Tool .* not found\.", re.DOTALL)
_TIMEOUT = re.compile(r"Tool .* timed out after \S+ s\.", re.DOTALL)
_RAISED = re.compile(r"([A-Za-z_][\w.]*)(?::|$)")


def failure_kind(content: str) -> str | None:
    """The kind of a failed call from the tool message `grpo.tools.run_tool_calls` made of it (TRL's
    `{'error': ...}`); None for a message that is not an error."""
    if not content.startswith(("{'error': ", '{"error": ')):
        return None
    try:
        value = ast.literal_eval(content)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or list(value) != ["error"] or not isinstance(value["error"], str):
        return None
    error = value["error"]
    if error.startswith("malformed tool call"):
        return "malformed call"
    if _UNKNOWN.fullmatch(error):
        return "unknown tool"
    if _TIMEOUT.fullmatch(error):
        return "timed out"
    raised = _RAISED.match(error)
    return f"raised {raised[1]}" if raised else None


def failure_kinds(results: Sequence[RolloutResult]) -> dict[str, int]:
    """Failed calls by kind, most frequent first; they sum to the rollouts' `tool_failures`. A rollout whose error
    messages do not match its count (a tool that itself returned `{'error': ...}`) counts as `unclassified`."""
    kinds: Counter[str] = Counter()
    for r in results:
        found = [kind for m in r.completion if m["role"] == "tool" and (kind := failure_kind(str(m["content"])))]
        if len(found) == r.tool_failures:
            kinds.update(found)
        elif r.tool_failures:
            kinds["unclassified"] += r.tool_failures
    return dict(kinds.most_common())


def multi_turn_problems(summary: MultiTurnSummary, context: int | None, max_completion_length: int) -> list[Problem]:
    """Rollout prompts (the rows' prompts plus the tools' schemas) too long for the context; and `keep` with a
    template that rewrites history after a tool turn: the trajectory the run trains on is not what the template
    would show the model (issue 17's `thinking_history`; with `split`, nothing to warn)."""
    out = []
    longest = summary.prompt_tokens[2]
    if context and longest + max_completion_length > context:
        lower = ", or lower grpo.max_completion_length" if longest < context else ""
        out.append(Problem("blocking", f"the rollouts' prompts, with the tools' schemas, are up to {longest} tokens: "
                                       f"plus grpo.max_completion_length ({max_completion_length}) they exceed the "
                                       f"model's context of {context} tokens; shorten the prompts or the tools' "
                                       f"descriptions{lower}"))
    if summary.thinking_history != "keep" or summary.append_only:
        return out
    if summary.rewritten:
        rollout, bridge, rewrite = summary.rewritten[0]
        where = (f"in {len(summary.rewritten)} of {summary.rollouts} sampled rollouts; rollout {rollout + 1}, after "
                 f"its turn {bridge + 1}: {rewrite.describe()}")
    else:
        where = f"after a tool turn ({summary.audit.tool_bridge.rewrites.describe()}, in the audit's probe)"
    out.append(Problem("warning", f"the template rewrites history {where}: with rollout.thinking_history: keep, "
                                  "each later turn is trained on text the template would not show the model; set "
                                  "rollout.thinking_history: split to train each turn after a rewrite on the "
                                  "template's own rendering"))
    return out


def _few_shot_format(few_shot, rewards) -> dict[str, float]:
    """Each configured format reward's mean over the few-shot examples' answers, scored as whole responses."""
    if few_shot is None:
        return {}
    answers = [e.answer for e in few_shot.examples]
    return {r.name: statistics.fmean(v for v in r.fn(answers) if v is not None) for r in format_rewards(rewards)}


def _fit_problems(tokenizer, checked, rewards, max_completion_length: int,
                  few_shot_format: dict[str, float]) -> list[Problem]:
    """Does the prefix fit the data: its length, the solutions' format, and the few-shot examples' format."""
    out: list[Problem] = []
    for name, mean in few_shot_format.items():
        if mean < 1.0:
            out.append(Problem("warning", f"the few-shot examples score {mean:.3f} on {name}, not 1.0: they teach "
                                          "another format than the reward scores; fix their answers"))
    prefixes = sorted(set(checked["prefix"]))
    longest = max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prefixes)
    if (problem := prefix_length_problem(longest, max_completion_length)) is not None:
        out.append(Problem("warning", problem))
    if "solution" in checked.column_names:
        groups: dict[str, tuple[list, list]] = {}  # rows may carry their own prefix: check each prefix's rows
        for prefix, solution, prompt in zip(checked["prefix"], checked["solution"], checked["prompt"], strict=True):
            groups.setdefault(prefix, ([], []))[0].append(solution)
            groups[prefix][1].append(prompt)
        for prefix, (solutions, prompts) in groups.items():
            out += [Problem("warning", p) for p in solution_format_problems(prefix, solutions, prompts, rewards)]
    return out


def prefix_tokens(tokenizer, prompt_ids: Sequence[int], prefix: str) -> list[str]:
    """The prompt's last tokens that together hold `prefix`, each decoded: the prefix as the model sees it.

    When the prefix merged with the text before it, the first of them also holds some of that text.
    """
    if not prefix:
        return []
    for k in range(1, len(prompt_ids) + 1):
        if tokenizer.decode(list(prompt_ids[-k:])).endswith(prefix):
            return [tokenizer.decode([t]) for t in prompt_ids[-k:]]
    return []


def _boundary_merges(tokenizer, dataset):
    merged = boundary_merges(PromptTokenizer(tokenizer), list(dataset["prompt"]), list(dataset["prefix"]),
                             [list(i) for i in dataset["prompt_ids"]])
    if not merged:
        return [], None
    row, whole, split = merged[0]
    return [i for i, _, _ in merged], describe_merge(tokenizer, f"row {row + 1}", whole, split)  # 1-based


def _trl_prompt_problems(tokenizer, dataset) -> list[Problem]:
    """The TRL backend tokenizes prompts itself: it must give the rendered ids (see backends/trl.py)."""
    try:
        check_prompt_ids(exact_ids_tokenizer(tokenizer), dataset)
    except PrefillKitError as exc:
        return [Problem("blocking", f"TRL backend: {exc}")]
    return []


def _summary(name: str, weight: float, values: list[float | None]) -> RewardSummary:
    scored = [v for v in values if v is not None]
    return RewardSummary(
        name=name, weight=weight, mean=statistics.fmean(scored) if scored else None,
        std=statistics.stdev(scored) if len(scored) > 1 else None,
        none_share=1 - len(scored) / len(values) if values else 0.0,
        constant=scored[0] if scored and all(v == scored[0] for v in scored) else None)


def _problems(*, g, num_rows, over_long, context, truncation_rate, summaries, zero_spread, merges, checked,
              merge_example, prefix, completions) -> list[Problem]:
    """The verdict's items, most fundamental first, each with what to do about it."""
    out: list[Problem] = []
    if over_long:
        shown = ", ".join(map(str, over_long[:5])) + (", ..." if len(over_long) > 5 else "")
        out.append(Problem("blocking", f"{len(over_long)} of {num_rows} prompts plus grpo.max_completion_length "
                                       f"({g.max_completion_length}) exceed the model's context of {context} tokens "
                                       f"(rows {shown}): drop or shorten them, or lower grpo.max_completion_length"))
    length_scorers = [s.name for s in summaries if s.name in LENGTH_REWARDS and s.constant is None]
    if truncation_rate > THRESHOLD and length_scorers:  # what the run can learn: to finish sooner
        out.append(Problem("warning", truncation_advice(truncation_rate, g.max_completion_length)
                           + truncation_expected(length_scorers)))
    elif truncation_rate > THRESHOLD:
        out.append(Problem("blocking", truncation_advice(truncation_rate, g.max_completion_length)))
    elif truncation_rate >= TRUNCATION_NOTICE:
        out.append(Problem("warning", truncation_advice(truncation_rate, g.max_completion_length)))
    for s in summaries:
        if s.none_share == 1.0:
            out.append(Problem("blocking", f"{s.name} returned None for every completion: it cannot score these "
                                           "rows (is the column it needs, e.g. `solution`, in the data?)"))
        elif s.none_share > 0:
            out.append(Problem("warning", f"{s.name} returned None for {percent(s.none_share)} of completions: "
                                          "those rows get no score from it"))
        elif s.constant is not None:
            out.append(Problem("warning", f"{s.name} is {s.constant!r} on every completion"
                                          + _constant_reason(s, prefix, completions, truncation_rate)))
    if zero_spread > THRESHOLD:
        out.append(Problem("blocking", zero_spread_advice(zero_spread)))
    if merges:
        ex = merge_example
        out.append(Problem("warning", f"the prefix merges with the text before it in {len(merges)} of {checked} "
                                      f"rows ({ex.where}: the prompt has tokens {ex.whole}, text + prefix would be "
                                      f"{ex.split}): the model conditions on other tokens at the boundary than "
                                      "it would generate; end the template's assistant header with a newline or "
                                      "start the prefix with one"))
    return out


def _constant_reason(s: RewardSummary, prefix: str, completions: list[str], truncation_rate: float) -> str:
    if s.name in THINK_REWARDS and "<think>" in prefix and not any("</think>" in c for c in completions):
        return ": the completions do not close </think>"
    if truncation_rate > THRESHOLD:
        return ": most completions are truncated before they could finish"
    if s.name in ("accuracy", "choice_accuracy") and s.constant == 0.0:
        return (": no completion is right; check that answers are written the way the reward extracts them, "
                "or use easier prompts")
    return ""
