"""Both backends run the same scripted tool rollouts token for token: ids, loss masks, and what rewards get.

A scripted policy (each turn's text chosen from the prompt so far) replaces sampling: the built-in backend's
`MultiTurnRollouts` samples through `hf_sampler` (patched), the TRL backend through `GRPOTrainer._generate_single_turn`
(patched), inside a real `train(...)` with `backend: trl`.
"""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

from prefill_kit.config import load_config
from prefill_kit.errors import ConfigError
from prefill_kit.runs.trl_config import grpo_config_kwargs, trl_extra_kwargs
from tests.conftest import REPO

PREFIX = "<think>\n"
STOP = "<|im_end|>"


def _call(name: str, **arguments) -> str:
    return f'\n<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def scripted_turn(text: str) -> str:
    """The policy: what the model writes next, given everything it has seen (`text`). Rows differ by their data
    row (its solution is in the conversation through the calculator's reset text: see `_kind`)."""
    done = text.count("<tool_response>")
    if HELDOUT in text:  # an eval row (`_eval_file`): add (ok) and an unknown tool (a failure), then the answer
        if f"{HELDOUT} call" not in text or done:
            return "Sum.\n</think>\n\n<answer>3</answer>"
        return "Add.\n</think>\n\nOk." + _call("add", a=1, b=2) + _call("nope", x=1)
    kind = _kind(text)
    if kind == 0:  # answers at once
        return "Easy.\n</think>\n\n<answer>7</answer>"
    if kind == 1:  # one call, then the answer
        return ("Add.\n</think>\n\nOk." + _call("add", a=1, b=2) if done == 0
                else "Sum.\n</think>\n\n<answer>3</answer>")
    # a malformed call and an unknown tool, then a good call, then would call again past max_turns
    if done == 0:
        return "Try.\n</think>\n\nHm.\n<tool_call>\n{not json\n</tool_call>" + _call("divide", a=1, b=0)
    return "Again.\n</think>\n\nOk." + _call("multiply", a=3, b=4)


HELDOUT = "HELDOUT"
# eval rows: (question, solution). Each "call" row's rollout takes 2 turns, 2 calls, 1 failure; each "direct" row's
# 1 turn. The Calculator reward is 1.0 where add(1, 2) = 3 is the row's solution: rows 0, 3 and 5.
EVAL_ROWS = [("call 1 + 2?", "3"), ("direct 3?", "3"), ("call 2 + 2?", "4"), ("call one plus two?", "3"),
             ("direct 7?", "7"), ("call 2 + 1?", "3")]


def _eval_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{HELDOUT} {q}"}], "solution": s})
                            + "\n" for q, s in EVAL_ROWS), encoding="utf-8")
    return path


def _kind(text: str) -> int:
    start = text.index("<|im_start|>user\n")
    return len(text[start:text.index("<|im_end|>", start)]) % 3  # the row's question decides (seed 0: all three)


def scripted_ids(tokenizer, prompt_ids: list[int]) -> list[int]:
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    whole = tokenizer(text + scripted_turn(text) + STOP, add_special_tokens=False)["input_ids"]
    assert whole[:len(prompt_ids)] == prompt_ids, "a scripted turn must not merge into the prompt's last token"
    return whole[len(prompt_ids):]


def _config(tiny_model_dir, tmp_path, template: str, *extra: str):
    return load_config(REPO / "examples" / "grpo_tiny_tools.yaml", [
        f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=1",
        f"data.template={template}", "output.log_completions_steps=1", "rewards=[{name: format}]",
        "grpo.max_completion_length=800", "grpo.num_generations=2", *extra])


def _template_writing_the_prefix(tmp_path) -> str:
    """Qwen2.5 whose generation prompt writes `<think>\\n` itself (as DeepSeek-R1's): the prefix must not double."""
    from prefill_kit.templates import load_template

    source = load_template("qwen2.5").source
    opening = "{{- '<|im_start|>assistant\\n' }}"
    assert source.count(opening) == 1
    path = tmp_path / "qwen2.5-think.jinja"
    path.write_text(source.replace(opening, "{{- '<|im_start|>assistant\\n<think>\\n' }}"))
    return str(path)


def run_trl(config, monkeypatch):
    """A real one-step `train` on the TRL backend with the scripted policy; what each rollout gave the loss."""
    from prefill_kit.backends import trl as trl_backend

    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    seen = []

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # TRL's transformers path returns ids through the first stop id; vLLM also returns log-probs (here: -id/1000)
        ids = [scripted_ids(tokenizer, list(p)) for p in prompt_ids]
        return ids, [[-t / 1000 for t in i] for i in ids]

    original = trl_backend.PrefillKitGRPOTrainer._generate_and_score_completions

    def record(self, inputs):
        output = original(self, inputs)
        seen.append((inputs, output, self.tool_rollouts.latest, dict(self.recorder.call), dict(self.recorder.scores)))
        return output

    monkeypatch.setattr(trl_backend.PrefillKitGRPOTrainer, "_generate_single_turn", generate)
    monkeypatch.setattr(trl_backend.PrefillKitGRPOTrainer, "_generate_and_score_completions", record)
    result = trl_backend.train(config)
    return result, seen


def run_builtin(config, row_indices: list[int]):
    """The built-in backend's rollout of the same data rows (each repeated for its generations, as TRL's batch is)."""
    from prefill_kit.grpo import multiturn
    from prefill_kit.grpo.policy import load_tokenizer
    from prefill_kit.prompts.training_data import load_training_data
    from prefill_kit.runs.checks import run_rewards, run_tools

    tokenizer = load_tokenizer(config)
    tools, rewards = run_tools(config, run_rewards(config))
    rollouts = multiturn.MultiTurnRollouts(config, tokenizer, tools)
    dataset = load_training_data(config.data, tokenizer)
    g = config.grpo.num_generations
    unique = row_indices[::g]
    assert [i for i in unique for _ in range(g)] == row_indices
    sampler = lambda prompts, budgets: [scripted_ids(tokenizer, p) for p in prompts]  # noqa: E731
    original = multiturn.hf_sampler
    multiturn.hf_sampler = lambda *a, **k: sampler
    try:
        return rollouts(None, dataset[unique], unique, rewards=rewards, num_generations=g, generation_config=None,
                        eos_ids=[tokenizer.eos_token_id])
    finally:
        multiturn.hf_sampler = original


def _rows(prompt_ids, prompt_mask, completion_ids, attention, loss_mask):
    """Per row: (prompt ids, completion ids, loss mask over them), padding removed."""
    out = []
    for j in range(prompt_ids.size(0)):
        keep = attention[j].bool()
        out.append((prompt_ids[j][prompt_mask[j].bool()].tolist(), completion_ids[j][keep].tolist(),
                    loss_mask[j][keep].tolist()))
    return out


@pytest.mark.parametrize("template", ["qwen2.5", "qwen3", "writes-prefix"])
def test_both_backends_agree_token_by_token(template, tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(REPO)
    if template == "writes-prefix":
        template = _template_writing_the_prefix(tmp_path)
    config = _config(tiny_model_dir, tmp_path, template)
    _, seen = run_trl(config, monkeypatch)
    inputs, output, latest, call, trl_scores = seen[0]
    from prefill_kit.backends.trl import PROMPT_INDEX_COLUMN

    row_indices = [int(x[PROMPT_INDEX_COLUMN]) for x in inputs]
    scored = run_builtin(config, row_indices)
    b = scored.batch

    trl_rows = _rows(output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"],
                     output["completion_mask"] * output["tool_mask"])
    builtin_rows = _rows(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_attention_mask,
                         b.completion_mask)
    assert len(trl_rows) == len(builtin_rows) == 8
    for j, (t, bi) in enumerate(zip(trl_rows, builtin_rows, strict=True)):
        assert t[0] == bi[0], f"row {j}: prompt ids differ"
        assert t[1] == bi[1], f"row {j}: completion ids differ"
        assert t[2] == bi[2], f"row {j}: loss masks differ"

    # the rollouts took several turns, and tools failed as messages, not crashes
    results = latest.results
    assert {r.turns for r in results} == {1, 2, 3}  # kinds 0, 1 and 2 of `scripted_turn`, max_turns 3
    assert sum(r.tool_failures for r in results) > 0

    # every assistant turn opens with the prefix exactly once, and the prefix is never in the loss
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for (prompt, completion, mask), r in zip(trl_rows, results, strict=True):
        ids = prompt + completion
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text.count(PREFIX) == r.turns and PREFIX + PREFIX not in text
        starts = r.trajectory.turn_starts
        for s in starts:
            before = tok.decode(ids[:s], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert before.endswith("<|im_start|>assistant\n" + PREFIX)
        full_mask = [0] * len(prompt) + mask
        sampled = [tok.decode([i for i, m in zip(ids[s:], full_mask[s:], strict=True) if m][:3]) for s in starts]
        assert not any(x.startswith("<think>") for x in sampled)
        assert sum(mask) == r.sampled_tokens > 0

    # TRL's sampling log-probs (vLLM returns them; the scripted ones are -id/1000) sit on the sampled ids, 0.0 on
    # bridges, as TRL lays out its own tool results
    for j, r in enumerate(results):
        mask = r.trajectory.mask[r.prompt_length:]
        expected = [-t / 1000 if m else 0.0 for t, m in zip(r.completion_ids, mask, strict=True)]
        assert output["sampling_per_token_logps"][j][:len(expected)].tolist() == pytest.approx(expected)

    # rewards got the same message lists (assistant contents start with the prefix) and scored the same
    assert call["completions"] == [r.completion for r in scored.results]
    assert all(m["content"].startswith(PREFIX) for c in call["completions"] for m in c if m["role"] == "assistant")
    assert call["prefix"] == scored.columns["prefix"]
    builtin_scores = {name: scored.scores[:, k].tolist() for k, name in enumerate(["format", "Calculator"])}
    assert trl_scores == builtin_scores


def test_trl_train_with_tools_writes_turn_metrics_and_turns(tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    """The shipped tools example on the TRL backend, real sampling on the tiny random model, two steps."""
    from prefill_kit.backends import trl as trl_backend

    monkeypatch.chdir(REPO)
    config = load_config(REPO / "examples" / "grpo_tiny_tools.yaml", [
        f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "backend=trl",
        "output.log_completions_steps=1"])
    result = trl_backend.train(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(1.0 <= r["turns/mean"] <= 3.0 and 0 <= r["tools/failures"] <= r["tools/calls"] for r in rows)
    assert all(r["completion_length"] <= 48 for r in rows)
    assert all("rewards/Calculator" in r for r in rows)
    logged = [json.loads(line) for line in (result.output_dir / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 16
    for row in logged:
        assistant = [t for t in row["turns"] if t["role"] == "assistant"]
        assert assistant and all(t["prefix"] == PREFIX for t in assistant)
        assert row["completion_length"] == sum(t["trained_tokens"] for t in assistant)


def test_trl_config_maps_max_turns_and_refuses_what_trl_cannot_train(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = _config(tiny_model_dir, tmp_path, "qwen2.5", "rollout.max_turns=3")
    assert grpo_config_kwargs(config)["max_tool_calling_iterations"] == 2  # TRL counts the turns after the first
    assert "max_tool_calling_iterations" not in grpo_config_kwargs(_config(
        tiny_model_dir, tmp_path, "qwen2.5", "rollout.environment=null"))
    split = _config(tiny_model_dir, tmp_path, "qwen2.5", "rollout.thinking_history=split")
    with pytest.raises(ConfigError, match=r"rollout.thinking_history: split .*--backend builtin"):
        grpo_config_kwargs(split)
    with pytest.raises(ConfigError, match=r"trl.max_tool_calling_iterations: .*set rollout.max_turns instead"):
        trl_extra_kwargs(_config(tiny_model_dir, tmp_path, "qwen2.5", "trl={max_tool_calling_iterations: 1}"))
    evaluating = grpo_config_kwargs(_config(tiny_model_dir, tmp_path, "qwen2.5",  # evaluation with tools: not refused
                                            f"data.eval_path={_eval_file(tmp_path)}", "train.eval_steps=1"))
    assert evaluating["eval_strategy"] == "steps" and evaluating["max_tool_calling_iterations"] == 2


def builtin_eval(config) -> dict:
    """The built-in backend's evaluation (`evaluate` with `eval_rollouts`) of the eval rows with the scripted policy."""
    from types import SimpleNamespace

    import torch

    from prefill_kit.backends.builtin.evaluation import eval_rollouts, evaluate
    from prefill_kit.grpo import multiturn
    from prefill_kit.grpo.policy import load_tokenizer
    from prefill_kit.prompts.training_data import load_eval_data
    from prefill_kit.runs.checks import run_rewards, run_tools

    tokenizer = load_tokenizer(config)
    tools, rewards = run_tools(config, run_rewards(config))
    original = multiturn.hf_sampler
    multiturn.hf_sampler = lambda *a, **k: lambda prompts, budgets: [scripted_ids(tokenizer, p) for p in prompts]
    try:
        return evaluate(None, load_eval_data(config.data, tokenizer), rewards=rewards, tokenizer=tokenizer,
                        generation_config=None, eos_ids=[tokenizer.eos_token_id],
                        num_generations=config.grpo.eval_num_generations, prompts_per_batch=4,
                        accelerator=SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu")),
                        seed=0, autocast=None, multi_turn=eval_rollouts(config, tokenizer, tools))
    finally:
        multiturn.hf_sampler = original


def test_trl_evaluates_with_tools_over_the_eval_rows(tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    """TRL's evaluation runs the multi-turn rollouts over the EVAL rows (environment reset with each), in two eval
    batches (8 and 4 completions), and logs the whole-set turn metrics the built-in backend's evaluation gives."""
    from prefill_kit.backends.trl import PROMPT_INDEX_COLUMN

    monkeypatch.chdir(REPO)
    config = _config(tiny_model_dir, tmp_path, "qwen2.5", f"data.eval_path={_eval_file(tmp_path)}",
                     "train.eval_steps=1", "grpo.eval_num_generations=2")
    result, seen = run_trl(config, monkeypatch)

    evals = [(inputs, latest, scores) for inputs, _, latest, _, scores in seen if HELDOUT in str(inputs[0]["prompt"])]
    assert [len(inputs) for inputs, _, _ in evals] == [8, 4]  # every eval completion, in two batches
    assert len(seen) == 3  # one training rollout, then the evaluation after step 1
    for inputs, latest, scores in evals:
        rows = [int(x[PROMPT_INDEX_COLUMN]) for x in inputs]
        # each rollout's conversation is its eval row's, after `reset` with that row; so is its Calculator reward
        for j, (index, conversation, r) in enumerate(zip(rows, latest.prompts, latest.results, strict=True)):
            question, solution = EVAL_ROWS[index]
            assert conversation[-1]["content"].startswith(f"{HELDOUT} {question} (You may call")
            calls = question.startswith("call")
            assert (r.turns, r.tool_calls, r.tool_failures) == ((2, 2, 1) if calls else (1, 0, 0))
            assert scores["Calculator"][j] == (1.0 if calls and solution == "3" else 0.0)

    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    [row] = [r for r in logged if "eval/reward" in r]
    assert row["eval/turns/mean"] == pytest.approx(20 / 12)  # 8 rollouts of 2 turns, 4 of 1
    assert (row["eval/tools/calls"], row["eval/tools/failures"]) == (16.0, 8.0)
    assert row["eval/rewards/Calculator"] == 0.5  # rows 0, 3, 5: 6 of 12 rollouts
    builtin = builtin_eval(config)
    assert {k: v for k, v in row.items() if k.startswith("eval/")} == pytest.approx(builtin)
    assert set(builtin) >= {"eval/turns/mean", "eval/tools/calls", "eval/tools/failures", "eval/reward"}
