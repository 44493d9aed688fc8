"""Mutation check: each named one-line mutation of a critical line must make the tests that guard it fail.

    python tests/mutations.py            # every mutation; ends with "N/N mutations caught", exit 1 if any missed
    python tests/mutations.py --list     # names only
    python tests/mutations.py NAME ...   # some of them

Each mutation is applied to a temporary copy of the checkout as a test sees it (README.md, pyproject.toml,
backends/, templates/, tests/, examples/, benchmarks/, .ci/: every file git does not ignore), made beside
this checkout with `../shared` linked, so that tests that need the reference data run there too. The
copy is also importable as installed: `prefill_kit/` holds copies of `backends/` and `templates/`, and the
copy comes first on PYTHONPATH (for subprocesses too). A mutation of `backends/` or `templates/` is applied
to both copies. Only the named test selection runs against it; the checkout itself is never modified.

The list must follow the code, so these are errors, not passes:
- a mutation whose original line no longer occurs exactly once;
- a guard that does not pass on the unmutated copy: every selection first runs there, all in one pytest
  session, and one that selects nothing, or holds a test that fails, errors or skips, cannot show a catch;
- a pytest exit other than 0 (missed) or 1 (caught) under a mutation: it is reported, and the run goes on.

Where `../shared/reference` is absent beside the checkout, a guard whose tests all need it (they skip) is
reported UNCHECKED, counted apart, and does not fail the run: it cannot be checked on that machine.

A mutation counts as caught only by a test that fails for it on every run: tests marked `timing` (their
outcome can depend on machine load or on when a signal lands) are deselected, so a chance failure of one
never passes for a catch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"  # as tests/conftest.py finds it
INSTALLED = {"backends": "prefill_kit/backends", "templates": "prefill_kit/templates"}  # where they install


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # as in the checkout
    original: str  # must occur exactly once in the file
    mutant: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids or -k expressions


MUTATIONS = [
    Mutation("generate returns an all-ones completion mask", "prefill_kit/grpo/rollout.py",
             "completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)\n",
             "completion_mask = torch.ones_like(completion_ids)\n",
             ("tests/test_builtin_train.py", "-k", "generate_masks")),
    Mutation("every rank takes the same prompts", "backends/builtin/loop.py",
             "process_index=rank, num_processes=world,", "process_index=0, num_processes=world,",
             ("tests/test_builtin_train.py", "-k", "two_cpu_processes")),
    Mutation("the shard start ignores the rank", "prefill_kit/grpo/prompt_order.py",
             "start = generation * per_step + process_index * prompts_per_process",
             "start = generation * per_step",
             ("tests/test_builtin_train.py", "-k", "sharding")),
    Mutation("gradients are never synchronised across ranks", "backends/builtin/loop.py",
             "with contextlib.nullcontext() if last else accelerator.no_sync(model), autocast():",
             "with accelerator.no_sync(model), autocast():",
             ("tests/test_builtin_train.py", "-k", "two_cpu_processes")),
    Mutation("atomic_output writes in place", "prefill_kit/data/io.py",
             'fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)',
             "fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)",
             ("tests/test_io.py",)),
    Mutation("the piecewise tokenizer drops the added tokens", "prefill_kit/prompts/tokens.py",
             "self._added_lists = {t: [i] for t, i in added.items()}",
             "self._added_lists = {t: [] for t, i in added.items()}",
             ("tests/test_prompt_tokens.py", "-k", "random_text and qwen")),
    Mutation("the piecewise tokenizer drops a piece's last token", "prefill_kit/prompts/tokens.py",
             "ids.update(zip(group, (e.ids for e in encoded), strict=True))",
             "ids.update(zip(group, (e.ids[:-1] for e in encoded), strict=True))",
             ("tests/test_prompt_tokens.py", "-k", "random_text and gpt2")),
    Mutation("Metaspace 'first' applied to every piece", "prefill_kit/prompts/tokens.py",
             "self._rest = rest_backend(backend)", "self._rest = backend",
             ("tests/test_prompt_tokens.py", "-k", "metaspace_first_prepends")),
    Mutation("the start-of-text piece encoded as any other", "prefill_kit/prompts/tokens.py",
             "                    pieces[0] = (pieces[0],)\n", "                    pass\n",
             ("tests/test_prompt_tokens.py", "-k", "random_text and metaspace-first")),
    Mutation("the prefix is doubled", "prefill_kit/prompts/render.py",
             "return RenderedPrompt(generation_prompt + prefix[k:], effective, solution)",
             "return RenderedPrompt(generation_prompt + prefix, effective, solution)",
             ("tests/test_render.py",)),
    Mutation("an overlap may start inside an added token", "prefill_kit/prompts/render.py",
             "and not _inside_token(text, len(text) - k, atomic):", ":",
             ("tests/test_prefix_contract.py", "-k", "overlap")),
    Mutation("conflicting reasoning openers pass", "prefill_kit/prompts/render.py",
             'if think_tail and "</think>" in think_tail[0] and "<think>" in prefix[k:]:',
             "if False:",
             ("tests/test_prefix_contract.py", "-k", "conflict")),
    Mutation("rendered input is wrapped again", "prefill_kit/prompts/render.py",
             "return _rendered_row(row, options, opening)", "pass",
             ("tests/test_prefix_contract.py", "-k", "rendered")),
    Mutation("the exact-ids tokenizer adds special tokens", "prefill_kit/prompts/tokens.py",
             "exact.backend_tokenizer.post_processor = processors.Sequence([])", "pass",
             ("tests/test_trl_backend.py",)),
    Mutation("TRL checkpoints keep the exact-ids copy", "backends/trl.py",
             "self.user_tokenizer.save_pretrained(output_dir or self.args.output_dir)", "pass",
             ("tests/test_backends.py", "-k", "users_tokenizer and trl")),
    Mutation("rewards ignore the prefix", "prefill_kit/rewards/response.py",
             "return completion_text(prefix) + completion", "return completion",
             ("tests/test_rewards.py",)),
    Mutation("rewards guess the prefix is already there", "prefill_kit/rewards/response.py",
             "return completion_text(prefix) + completion",
             "return completion if completion.startswith(completion_text(prefix)) "
             "else completion_text(prefix) + completion",
             ("tests/test_rewards.py",)),
    Mutation("unfinished thinking earns accuracy", "prefill_kit/rewards/response.py",
             "return opened >= 0 and response.find(f\"</{think_tag}>\", opened) < 0", "return False",
             ("tests/test_rewards.py", "-k", "unfinished")),
    Mutation("the loss covers prefix tokens", "prefill_kit/grpo/rollout.py",
             "completion_ids = out[:, ids.size(1):]  # (B, C)", "completion_ids = out[:, ids.size(1) - 2:]",
             ("tests/test_builtin_train.py", "-k", "generate_masks or only_completion_positions")),
    Mutation("resume loses the scheduler", "backends/builtin/loop.py",
             "accelerator.register_for_checkpointing(scheduler, state)",
             "accelerator.register_for_checkpointing(state)",
             ("tests/test_builtin_train.py", "-k", "resume")),
    Mutation("the sandbox base class is a plain Environment", "templates/sandbox.py",
             "class _Sandbox(ImmutableSandboxedEnvironment):", "class _Sandbox(jinja2.Environment):",
             ("tests/test_templates_loader.py",)),
    Mutation("a clean run keeps a stale rejects file", "prefill_kit/data/writers.py",
             "        Path(path).unlink(missing_ok=True)\n", "        pass\n",
             ("tests/test_render_files.py", "-k", "stale")),
    Mutation("PyYAML's 1e-5 stays a string", "prefill_kit/config.py",
             'Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML12_FLOAT), list("-+0123456',
             'pass  # "-+0123456',
             ("tests/test_config.py", "-k", "float_spelling")),
    Mutation("paths are not checked before the model loads", "backends/builtin/loop.py",
             "    check_paths(config)\n", "    pass\n",
             ("tests/test_run_checks.py", "-k", "fail_before_anything_loads and builtin")),
    Mutation("a new run does not see the old run's files", "prefill_kit/runs/session.py",
             "    found = run_files(run_dir)\n", "    found = []\n",
             ("tests/test_run_checks.py", "-k", "refuses_a_directory or what_counts")),
    Mutation("completion logs drop the question", "prefill_kit/runs/completion_log.py",
             'row["question"] = questions[i]', "pass",
             ("tests/test_completion_log.py", "-k", "question_and_solution_are_logged")),
    Mutation("verl's compute_score drops the response prefix", "prefill_kit/integrations/verl.py",
             'columns["prefix"] = [info.get("response_prefix") or ""]', 'columns["prefix"] = [""]',
             ("tests/test_verl_reward.py",)),
    Mutation("the verl template keeps the newline Jinja drops", "prefill_kit/integrations/verl_export.py",
             'body = source[:-2] if source.endswith("\\r\\n") else source[:-1] if source.endswith(("\\n", "\\r")) '
             'else source', "body = source",
             ("tests/test_verl_export.py", "-k", "suffix")),
    Mutation("the verl export pairs rows with rejected records", "prefill_kit/prompts/batch.py",
             "            result.rows, result.kept = rows, kept\n", "            result.rows = rows\n",
             ("tests/test_verl_export.py", "-k", "aligned")),
    Mutation("train starts without checking the [train] extra", "prefill_kit/cli/train.py",
             'require_train("prefill-kit train", ("torch", "accelerate", "trl"))', "pass",
             ("tests/test_extras.py",)),
    # trackers and evaluation during training (issue 12)
    Mutation("trackers get their own metric names", "prefill_kit/runs/session.py",
             'tracker.log(tracker_values(row), step=row["step"])',
             'tracker.log({"train/" + k: v for k, v in tracker_values(row).items()}, step=row["step"])',
             ("tests/test_trackers_eval.py", "-k", "tensorboard_holds and builtin")),
    Mutation("a resumed run keeps the stopped run's later TensorBoard points", "prefill_kit/runs/trackers.py",
             "purge_step=resume_step + 1)", ")",
             ("tests/test_trackers_eval.py", "-k", "resume_with_eval")),
    Mutation("a missing tracker package goes unnoticed", "prefill_kit/runs/trackers.py",
             "importlib.import_module(package)", 'importlib.import_module("json")',
             ("tests/test_trackers_eval.py", "-k", "missing_tracker and builtin")),
    Mutation("eval sampling draws from the training random state", "backends/builtin/evaluation.py",
             "with forked_rng(accelerator.device, seed):", "with contextlib.nullcontext():",
             ("tests/test_trackers_eval.py", "-k", "exactly_as_without")),
    Mutation("TRL's padding repeats count in the eval means", "backends/trl.py",
             "if seen[index] < num_generations:", "if True:",
             ("tests/test_trackers_eval.py", "-k", "one_record_set")),
    Mutation("TRL samples eval completions at the training temperature", "backends/trl.py",
             "if self.eval_temperature is None:", "if True:",
             ("tests/test_trackers_eval.py", "-k", "eval_temperature and trl")),
    Mutation("worker processes take Ctrl-C themselves", "prefill_kit/interrupts.py",
             "print a traceback).\"\"\"\n    signal.signal(signal.SIGINT, signal.SIG_IGN)",
             "print a traceback).\"\"\"\n    signal.signal(signal.SIGINT, signal.default_int_handler)",
             ("tests/test_cli_interrupts.py", "-k", "ctrl_c or verify_workers")),
    Mutation("a closed stdout ends in a BrokenPipeError traceback", "prefill_kit/cli/__init__.py",
             "    except BrokenPipeError:\n", "    except ():\n",
             ("tests/test_cli_interrupts.py", "-k", "closed_stdout")),
    Mutation("template loops are not counted", "templates/sandbox.py",
             "loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None).set_lineno(loop.iter.lineno)",
             "pass", ("tests/test_sandbox_limits.py", "-k", "each_limit")),
    Mutation("CSV rows are named by their data row, not their line", "prefill_kit/data/readers.py",
             "            yield before + 1\n", "            yield before\n",
             ("tests/test_row_locations.py", "-k", "csv")),
    Mutation("plot legends sit over the curves", "prefill_kit/runs/plots.py",
             'ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)',
             "ax.legend(fontsize=7)", ("tests/test_plot.py", "-k", "legends")),
    Mutation("the TRL backend prints a metrics dict per step", "backends/trl.py",
             "if self.pop_callback(ProgressCallback) is not None:", "if False:",
             ("tests/test_backends.py", "-k", "metric_keys")),
    Mutation("GSPO's sequence weight is a sum, not a length-normalised mean", "prefill_kit/grpo/loss.py",
             "return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)",
             "return (log_ratio * mask).sum(-1).unsqueeze(-1)",
             ("tests/test_grpo_math.py", "-k", "sequence_level")),
    Mutation("cispo's clamped weight carries a gradient", "prefill_kit/grpo/loss.py",
             "return -torch.clamp(coef, max=epsilon_high).detach() * advantages * logps",
             "return -torch.clamp(coef, max=epsilon_high) * advantages * logps",
             ("tests/test_grpo_math.py", "-k", "cispo")),
    Mutation("cispo is divided by the accumulation steps", "prefill_kit/grpo/loss.py",
             'WINDOW_NORMALIZED = frozenset({"dapo", "cispo"})', 'WINDOW_NORMALIZED = frozenset({"dapo"})',
             ("tests/test_builtin_train.py", "-k", "accumulation")),
    Mutation("the LoRA reference keeps the adapter on", "backends/builtin/loop.py",
             "with policy.disable_adapter() if ref_model is None else contextlib.nullcontext():",
             "with contextlib.nullcontext():",
             ("tests/test_lora.py", "-k", "builtin_trains")),
    Mutation("LoRA checkpoints copy the base weights", "backends/lora.py",
             "weights.clear()  # the base weights", "pass  # the base weights",
             ("tests/test_lora.py", "-k", "resume_with")),
    Mutation("a LoRA resume loads no adapter", "backends/lora.py",
             "load_adapter_weights(accelerator.unwrap_model(models.pop(0)), Path(input_dir))", "models.pop(0)",
             ("tests/test_lora.py", "-k", "resume_with")),
    # issue 17: the multi-turn bridge and token-in-token-out trajectories
    Mutation("a bridge doubles the prefix", "prefill_kit/prompts/turns.py",
             "text = whole.prompt[len(old):]\n", "text = whole.prompt[len(old):] + whole.prefix\n",
             ("tests/test_turns.py", "-k", "prefix_once or qwen-gpt2")),
    Mutation("a tool result inside the mask", "prefill_kit/prompts/turns.py",
             "self._mask += [0] * len(bridge.ids)", "self._mask += [1] * len(bridge.ids)",
             ("tests/test_turns.py", "-k", "token_in_token_out and qwen2.5-qwen")),
    Mutation("a sampled id re-encoded", "prefill_kit/prompts/turns.py",
             "        self._ids += ids\n", "        self._ids += self._encoder.encode([text])[0]\n",
             ("tests/test_turns.py", "-k", "never_re_encoded")),
    Mutation("the bridge is cut before the stop token's trailing text", "prefill_kit/prompts/turns.py",
             "rendered[:stop_end].count(stop)", "rendered[:stop_end].count(stop) - 1",
             ("tests/test_turns.py", "-k", "consecutive_tool_results or qwen3_rewrite")),
    Mutation("a bridge after a rewrite doubles the prefix", "prefill_kit/prompts/turns.py",
             "    text = whole.prompt[end:]\n", "    text = whole.prompt[end:] + whole.prefix\n",
             ("tests/test_turns.py", "-k", "deepseek_r1_bridge")),
    # issue 22: the layers (data < prompts, rewards < grpo < runs < backends < cli) and the shared run session
    Mutation("the data layer imports the renderer again", "prefill_kit/data/writers.py",
             "from prefill_kit.data.io import atomic_directory, atomic_output, dump_json_line\n",
             "from prefill_kit.data.io import atomic_directory, atomic_output, dump_json_line\n"
             "import prefill_kit.prompts.render  # noqa\n",
             ("tests/test_layers.py", "-k", "no_module_level_import")),
    Mutation("a checkpoint inside the run directory is not found", "prefill_kit/runs/session.py",
             "    found = last_checkpoint(path, (marker,)) if path.is_dir() else None\n",
             "    found = None\n",
             ("tests/test_builtin_train.py", "-k", "resume")),
    # issue 19: the added-token cutter (trie, cache), the Metaspace rest backend, the whole route
    Mutation("the added-token trie prefers the shorter token", "prefill_kit/prompts/tokens.py",
             'return chain + ("(?:" + body + ")?" if None in node else body)',
             'return chain + ("(?:" + body + ")??" if None in node else body)',
             ("tests/test_prompt_tokens.py", "-k", "leftmost_longest or many_added")),
    Mutation("the added-token cutter is cached by the number of tokens", "prefill_kit/prompts/tokens.py",
             "    key = tokens\n", "    key = len(tokens)\n",
             ("tests/test_prompt_tokens.py", "-k", "cutter or cached")),
    Mutation("the rest backend drops the normalizer", "prefill_kit/prompts/tokens.py",
             "rest.normalizer = backend.normalizer", "pass",
             ("tests/test_prompt_tokens.py", "-k", "random_text and unigram")),
    Mutation("the whole route adds special tokens", "prefill_kit/prompts/tokens.py",
             "self._first.encode_batch_fast(list(texts), add_special_tokens=False)",
             "self._first.encode_batch_fast(list(texts), add_special_tokens=True)",
             ("tests/test_prompt_tokens.py", "-k", "post_processor")),
    Mutation("split_special_tokens on the tokenizer is ignored", "prefill_kit/prompts/tokens.py",
             'if backend.encode_special_tokens or getattr(tokenizer, "split_special_tokens", False):',
             "if backend.encode_special_tokens:",
             ("tests/test_prompt_tokens.py", "-k", "split_special_tokens")),
    # issue 18: what a new user meets (special tokens from a template file, SIGTERM, one config check, reward hint)
    Mutation("a template file does not get the tokenizer's special tokens", "prefill_kit/prompts/options.py",
             "        return _with_tokens(load_template(template), special, added)\n",
             "        return _with_tokens(load_template(template), {}, added)\n",
             ("tests/test_template_special_tokens.py",)),
    Mutation("SIGTERM is not turned into an interrupt", "prefill_kit/interrupts.py",
             "previous = signal.signal(signal.SIGTERM, _raise_terminated)",
             "previous = signal.getsignal(signal.SIGTERM)",
             ("tests/test_cli_interrupts.py", "-k", "sigterm")),
    Mutation("a new pool worker ignores SIGTERM instead of holding it", "prefill_kit/interrupts.py",
             "    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n",
             "    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set()); signal.signal(signal.SIGTERM, "
             "signal.SIG_IGN)\n",
             ("tests/test_cli_interrupts.py", "-k", "before_the_workers_initializer")),
    Mutation("pool workers stay in the parent's process group", "prefill_kit/interrupts.py",
             "    os.setpgid(0, 0)\n", "    pass\n",
             ("tests/test_cli_interrupts.py", "-k", "sigterm_mid_render or leaves_the_parents_process_group")),
    Mutation("preflight skips the held-out eval check", "prefill_kit/runs/checks.py",
             "        check_eval_held_out(config.data.path, config.data.eval_path)\n", "",
             ("tests/test_preflight.py", "-k", "training_data_as_train")),
    Mutation("reward never warns about a doubled prefix", "prefill_kit/cli/reward.py",
             "        if doubled * 2 > total:\n", "        if False:\n",
             ("tests/test_cli_messages.py", "-k", "reward_warns")),
    # issue 20: guards for behaviours a careless one-line edit broke unnoticed (the second audit)
    Mutation("padding on the backend takes the piecewise path", "prefill_kit/prompts/tokens.py",
             "if backend.truncation is not None or backend.padding is not None:",
             "if backend.truncation is not None:",
             ("tests/test_prompt_tokens.py", "-k", "padding_on_the_backend")),
    Mutation("BPE dropout takes the piecewise path", "prefill_kit/prompts/tokens.py",
             'if getattr(backend.model, "dropout", None):', "if False:",
             ("tests/test_prompt_tokens.py", "-k", "bpe_dropout")),
    Mutation("Metaspace 'first' inside a Sequence is kept in the copy", "prefill_kit/prompts/tokens.py",
             'return {**step, "pretokenizers": [s for s, _ in steps]}, any(changed for _, changed in steps)',
             "return step, any(changed for _, changed in steps)",
             ("tests/test_prompt_tokens.py", "-k", "inside_a_sequence")),
    Mutation("an added token ending where the overlap starts cuts into it", "prefill_kit/prompts/render.py",
             "max(0, position - len(token) + 1))\n        while 0 <= start < position:\n"
             "            if start + len(token) > position:",
             "max(0, position - len(token)))\n        while 0 <= start < position:\n"
             "            if start + len(token) >= position:",
             ("tests/test_render.py", "-k", "inside_token or right_after")),
    Mutation("continue_final accepts a template that rewrites the message", "prefill_kit/prompts/render.py",
             "if not prompt.endswith(partial):", "if False:",
             ("tests/test_render.py", "-k", "rewrites_the_message")),
    Mutation("pass-rendered takes the prefix after the first assistant opening", "prefill_kit/prompts/render.py",
             "after = prompt[prompt.rfind(opening) + len(opening):]",
             "after = prompt[prompt.find(opening) + len(opening):]",
             ("tests/test_prefix_contract.py", "-k", "last_assistant_opening")),
    Mutation("choice_accuracy reads the letter inside the thinking", "prefill_kit/rewards/choice.py",
             "region = text[close + len(think_tag) + 3:] if close >= 0 else text", "region = text",
             ("tests/test_rewards.py", "-k", "choice_accuracy_reads")),
    Mutation("accuracy reads the answer inside the thinking", "prefill_kit/rewards/extract.py",
             "region = response[close + len(think_tag) + 3:] if close >= 0 else response", "region = response",
             ("tests/test_rewards.py", "-k", "accuracy_reads_the_answer")),
    Mutation("a near decimal is judged unequal", "prefill_kit/rewards/numeric.py",
             "for g, p in candidates):\n        return None\n", "for g, p in candidates):\n        return False\n",
             ("tests/test_rewards.py", "-k", "defers_near_decimals")),
    Mutation("a slash fraction loses its sign", "prefill_kit/rewards/numeric.py",
             'return Fraction(int(match.group(2)), int(match.group(3))) * (-1 if match.group(1) == "-" else 1)',
             "return Fraction(int(match.group(2)), int(match.group(3)))",
             ("tests/test_rewards.py", "-k", "keeps_the_sign or slash_fraction")),
    Mutation("DAPO's token count is not divided by the number of processes", "backends/builtin/loop.py",
             "num_items = accelerator.gather(batch.completion_mask.sum().to(accelerator.device)).sum().item() / world",
             "num_items = accelerator.gather(batch.completion_mask.sum().to(accelerator.device)).sum().item()",
             ("tests/test_builtin_equivalence.py", "-k", "two_processes")),
    Mutation("every rank takes rank 0's advantages", "backends/builtin/loop.py",
             "mine = advantages[rank * n:(rank + 1) * n]  # (B,)",
             "mine = advantages[:n]  # (B,)",
             ("tests/test_builtin_equivalence.py", "-k", "two_processes")),
    Mutation("gradients are clipped after the optimizer step", "backends/builtin/loop.py",
             "        grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm > 0 "
             "else None\n        learning_rate = scheduler.get_last_lr()[0]\n        optimizer.step()\n",
             "        learning_rate = scheduler.get_last_lr()[0]\n        optimizer.step()\n"
             "        grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm > 0 "
             "else None\n",
             ("tests/test_builtin_equivalence.py", "-k", "backward_then_clip")),
    Mutation("every epoch uses the same prompt order", "prefill_kit/grpo/prompt_order.py",
             "manual_seed(seed * 100_003 + epoch)", "manual_seed(seed * 100_003)",
             ("tests/test_builtin_equivalence.py", "-k", "own_order")),
    Mutation("the last checkpoint of a run is chosen by name", "prefill_kit/runs/session.py",
             "key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)",
             "key=lambda p: p.name, default=None)",
             ("tests/test_builtin_equivalence.py", "-k", "highest_step")),
    # issue 18: the ms-swift plugin on a real `swift rlhf` run (flat single-turn ids, ms-swift's soft_overlong window)
    Mutation("the ms-swift plugin takes a flat sample's ids as turns", "prefill_kit/integrations/swift_calls.py",
             "        if isinstance(item, Integral):\n", "        if False:\n",
             ("tests/test_swift_calls.py",)),
    Mutation("the ms-swift soft_overlong ignores --soft_max_length", "prefill_kit/integrations/swift_calls.py",
             'getattr(args, "soft_max_length", None) or args.max_completion_length',
             "args.max_completion_length", ("tests/test_swift_calls.py",)),
    Mutation("the ms-swift launch line drops the reward weights", "prefill_kit/cli/integrations.py",
             'words += ["--reward_weights", *(f"{r.weight:g}" for r in spec)]', "pass",
             ("tests/test_integrations_cli.py",)),
    # issue 21: the sandbox's limits are checked before the value is built, and in loops without calls
    Mutation("+ between strings is not size-checked", "templates/sandbox.py",
             "            if isinstance(left, str | list | tuple) and type(left) is type(right):\n"
             "                _check_size_of(len(left) + len(right), left)\n"
             "            return _check_size(left + right)\n",
             "            return left + right\n",
             ("tests/test_sandbox_growth.py", "-k", "plus")),
    Mutation("a message holding None reaches the template unnormalised", "templates/__init__.py",
             " and not any(v is None for v in message.values()):", ":",
             ("tests/test_templates_loader.py", "-k", "none_are_dropped")),
    Mutation("a message with reasoning reaches the template unaliased", "templates/__init__.py",
             "    if _REASONING_KEYS.isdisjoint(message) and not", "    if not",
             ("tests/test_templates_loader.py", "-k", "reasoning_fields")),
    Mutation("namespace() skips the argument checks", "templates/sandbox.py",
             "            return _bounded_call(_Namespace, args, kwargs)\n",
             "            return _Namespace(*args, **kwargs)\n",
             ("tests/test_sandbox_fast_paths.py", "-k", "namespace_shortcut")),
    Mutation("namespace() passes jinja's loop keywords on", "templates/sandbox.py",
             '            kwargs.pop("_loop_vars", None)\n            return _bounded_call(_Namespace',
             "            return _bounded_call(_Namespace",
             ("tests/test_sandbox_fast_paths.py", "-k", "namespace_shortcut")),
    Mutation("the str + str shortcut skips the length check", "templates/sandbox.py",
             "                if len(left) + len(right) > LIMITS.max_string:\n"
             "                    _check_size_of(len(left) + len(right), left)\n"
             "                return left + right\n",
             "                return left + right\n",
             ("tests/test_sandbox_fast_paths.py", "-k", "limit")),
    Mutation("int * str is checked only after it is built", "templates/sandbox.py",
             "            _check_repeat(right, left)\n", "            pass\n",
             ("tests/test_sandbox_growth.py", "-k", "times and int and str")),
    Mutation("loops without a call stop checking the wall clock", "templates/sandbox.py",
             "            if not budget.iterations % 256:\n                budget.check_time()\n",
             "            pass\n",
             ("tests/test_sandbox_growth.py", "-k", "wall_clock and without")),
    # issue 17 (rollouts): the training loss mask, split samples' advantages, the length bound over bridges
    Mutation("a tool result inside the training loss mask", "prefill_kit/grpo/multiturn.py",
             "    completion_mask = pad_sequence([torch.tensor(r.completion_mask, dtype=torch.long) for r in rows],",
             "    completion_mask = pad_sequence([torch.ones(len(r.completion_ids), dtype=torch.long) for r in rows],",
             ("tests/test_rollouts.py", "-k", "loss_rows_keep")),
    Mutation("split samples losing their advantage", "prefill_kit/grpo/multiturn.py",
             "    return advantages[torch.as_tensor(list(owners), dtype=torch.long)]\n",
             "    return advantages[torch.as_tensor(list(owners), dtype=torch.long)] * torch.tensor("
             "[float(k == 0 or owners[k - 1] != o) for k, o in enumerate(owners)])\n",
             ("tests/test_rollouts.py", "-k", "split_sample_takes")),
    Mutation("a tool result may pass max_completion_length", "prefill_kit/grpo/multiturn.py",
             "bridge = builder.add_messages(tool_messages, limit=limit[i] - 1)",
             "bridge = builder.add_messages(tool_messages, limit=None)",
             ("tests/test_rollouts.py", "-k", "max_completion_length")),
    # issue 22: one rule each (NaN/None, the weighted total, the last user text); the quick start without chatter
    Mutation("a NaN score is logged as NaN", "prefill_kit/rewards/registry.py",
             "return None if value != value else value", "return value",
             ("tests/test_completion_log.py", "-k", "json_safe")),
    Mutation("logged totals are summed in float64, not as the rollout sums them", "prefill_kit/grpo/scoring.py",
             "dtype=torch.float32).reshape(len(scores), len(weights))",
             "dtype=torch.float64).reshape(len(scores), len(weights))",
             ("tests/test_completion_log.py", "-k", "last_bit")),
    Mutation("the question is the first user message", "prefill_kit/data/formats.py",
             "    for message in reversed(messages):\n        if message.get(\"role\") == \"user\":\n"
             "            return message_text(",
             "    for message in messages:\n        if message.get(\"role\") == \"user\":\n"
             "            return message_text(",
             ("tests/test_completion_log.py", "tests/test_few_shot.py", "-k", "last_user_message or multi_turn_rows")),
    Mutation("datasets' progress bars show in the quick start", "prefill_kit/cli/quiet.py",
             "        disable_progress_bars()\n", "        pass\n",
             ("tests/test_example_tiny.py", "-k", "chatter")),
    Mutation("transformers' progress bars show in the quick start", "prefill_kit/cli/quiet.py",
             "transformers_logging.disable_progress_bar()", "None",
             ("tests/test_example_tiny.py", "-k", "chatter")),
    Mutation("the tied-embedding notice shows in the quick start", "prefill_kit/cli/quiet.py",
             "save_logger.addFilter(notice)", "None",
             ("tests/test_example_tiny.py", "-k", "chatter")),
    # issue 17: preflight/eval multi-turn (the report's true counts, keep-with-rewrites warning, eval's rollouts)
    Mutation("preflight samples single-turn completions for a tools run", "prefill_kit/runs/preflight.py",
             "multi_turn = MultiTurnRollouts(config, tokenizer, tools) if tools is not None else None",
             "multi_turn = None",
             ("tests/test_preflight_multiturn.py", "-k", "true_turns")),
    Mutation("preflight reports tool calls as failures", "prefill_kit/runs/preflight.py",
             'tool_failures=int(figures["tools/failures"])', 'tool_failures=int(figures["tools/calls"])',
             ("tests/test_preflight_multiturn.py", "-k", "true_turns")),
    Mutation("failure kinds trust error-like messages over the failure count", "prefill_kit/runs/preflight.py",
             "        if len(found) == r.tool_failures:\n", "        if True:\n",
             ("tests/test_preflight_multiturn.py", "-k", "failure_kinds")),
    Mutation("preflight warns about keep under split too", "prefill_kit/runs/preflight.py",
             'if summary.thinking_history != "keep" or summary.append_only:', "if summary.append_only:",
             ("tests/test_preflight_multiturn.py", "-k", "keep_with_a_template")),
    Mutation("preflight ignores the rewrites the sampled rollouts met", "prefill_kit/runs/preflight.py",
             "return not self.rewritten and (", "return (",
             ("tests/test_preflight_multiturn.py", "-k", "probe_saw_none")),
    Mutation("evaluation of a tools run is single-turn", "backends/builtin/loop.py",
             "multi_turn=eval_rollouts(config, tokenizer, tools))", "multi_turn=None)",
             ("tests/test_preflight_multiturn.py", "-k", "evaluation_runs_the_multi_turn")),
    Mutation("multi-turn evaluation rolls out the training rows", "backends/builtin/evaluation.py",
             "path=config.data.eval_path)", "path=config.data.path)",
             ("tests/test_preflight_multiturn.py", "-k", "evaluation_runs_the_multi_turn")),
    # issue 17: TRL backend multi-turn (prefill-kit's rollout loop as GRPOTrainer's rollout_func)
    Mutation("the TRL backend leaves tool rollouts to TRL (no bridge, no prefix after the first turn)",
             "backends/trl.py", "super().__init__(*args, rollout_func=tool_rollouts, **kwargs)",
             "super().__init__(*args, rollout_func=None, **kwargs)",
             ("tests/test_backends_multiturn.py", "-k", "agree and qwen2")),
    Mutation("the TRL backend trains on the prefix, bridges and tool results", "backends/trl.py",
             "            mask = r.trajectory.mask[r.prompt_length:]\n",
             "            mask = [1] * len(r.completion_ids)\n",
             ("tests/test_backends_multiturn.py", "-k", "agree and qwen2")),
    Mutation("TRL's rewards get its decoded text, not message lists with the prefix", "backends/trl.py",
             "prompts, completions = batch.prompts, [r.completion for r in batch.results]",
             "prompts = batch.prompts",
             ("tests/test_backends_multiturn.py", "-k", "agree and qwen2")),
    Mutation("sampling log-probs shifted off the sampled ids", "backends/trl.py",
             "logprobs[j - p] = sampled[j - start]", "logprobs[j - p] = sampled[j - start - 1]",
             ("tests/test_backends_multiturn.py", "-k", "agree and qwen2")),
    Mutation("TRL resets the environments with its own prompts on the next batch", "backends/trl.py",
             "        self.environments = None\n        output = super()",
             "        output = super()",
             ("tests/test_backends_multiturn.py", "-k", "train_with_tools")),
    Mutation("max_turns mapped to max_tool_calling_iterations one too many", "prefill_kit/runs/trl_config.py",
             '{"max_tool_calling_iterations": r.max_turns - 1}', '{"max_tool_calling_iterations": r.max_turns}',
             ("tests/test_backends_multiturn.py", "-k", "maps_max_turns")),
    # issue 17: TRL eval with tools (the eval rows' rollouts, whole-set turn metrics)
    Mutation("TRL eval with tools rolls out the training rows", "backends/trl.py",
             "rollouts = self.rollouts if trainer.model.training else self.eval_rollouts",
             "rollouts = self.rollouts",
             ("tests/test_backends_multiturn.py", "-k", "over_the_eval_rows")),
    Mutation("TRL eval turn metrics come from the last eval batch only", "backends/trl.py",
             "turn_metrics([c for _, c in kept])", "turn_metrics([c for _, c in kept][-4:])",
             ("tests/test_backends_multiturn.py", "-k", "over_the_eval_rows")),
    Mutation("TRL eval with tools is refused again", "prefill_kit/runs/trl_config.py",
             '    return {"max_tool_calling_iterations": r.max_turns - 1}',
             '    if config.data.eval_path:\n        raise ConfigError("data.eval_path")\n'
             '    return {"max_tool_calling_iterations": r.max_turns - 1}',
             ("tests/test_backends_multiturn.py", "-k", "maps_max_turns")),
    # issue 17/18 follow-up: a Ctrl-C that lands while the render pool forks is held, not lost
    Mutation("the parent ignores a Ctrl-C that lands while its workers fork", "prefill_kit/interrupts.py",
             "previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))",
             "previous = signal.signal(signal.SIGINT, signal.SIG_IGN)",
             ("tests/test_cli_interrupts.py", "-k", "while_the_workers_fork")),
    Mutation("a Ctrl-C held while the workers fork is not raised afterwards", "prefill_kit/interrupts.py",
             "        if held:\n", "        if False:\n",
             ("tests/test_cli_interrupts.py", "-k", "while_the_workers_fork")),

    # issue 17: exactness matrix (whole rollouts on every template x family, the response parser, the bridge memo)
    Mutation("the bridge-ids memo forgets the tokenizer", "prefill_kit/prompts/turns.py",
             "    key = (encoder, stop, text)\n", "    key = (stop, text)\n",
             ("tests/test_rollout_matrix.py", "-k", "memo")),
    Mutation("the response parser is not given the prompt", "prefill_kit/grpo/tools.py",
             "parsed = tokenizer.parse_response(ids, prefix=list(prompt_ids or []), tools=tools)",
             "parsed = tokenizer.parse_response(ids)",
             ("tests/test_rollout_matrix.py", "-k", "response_template")),
    Mutation("a sampled turn is decoded alone", "prefill_kit/grpo/multiturn.py",
             "            text = turn_text(tokenizer, prompt[-1], ids)\n",
             "            text = tokenizer.decode(ids, skip_special_tokens=False)\n",
             ("tests/test_rollout_matrix.py", "-k", "exact and mistral-metaspace-first-merging")),
    Mutation("a sampled id re-encoded in a whole rollout", "prefill_kit/prompts/turns.py",
             "        self._ids += ids\n", "        self._ids += self._encoder.encode([text])[0]\n",
             ("tests/test_rollout_matrix.py", "-k", "exact and qwen2.5-qwen")),
    Mutation("a tool result inside the mask of a whole rollout", "prefill_kit/prompts/turns.py",
             "self._mask += [0] * len(bridge.ids)", "self._mask += [1] * len(bridge.ids)",
             ("tests/test_rollout_matrix.py", "-k", "exact and qwen2.5-gpt2")),
    Mutation("a whole rollout's bridge doubles the prefix", "prefill_kit/prompts/turns.py",
             "text = whole.prompt[len(old):]\n", "text = whole.prompt[len(old):] + whole.prefix\n",
             ("tests/test_rollout_matrix.py", "-k", "exact and gemma-gpt2")),
    # issue 17: the matrix's open cells closed (response parser's prefix, legacy SentencePiece turn text), the loss's
    # attention over bridges and padding
    Mutation("the parsed content keeps the prefix the prompt wrote", "prefill_kit/grpo/tools.py",
             'parsed = {**parsed, "content": parsed["content"].removeprefix(turn_prefix)}', "pass",
             ("tests/test_rollout_matrix.py", "-k", "prefix_the_prompt_wrote or (exact and llama3-gpt2)")),
    Mutation("a turn after an added token is read in context only", "prefill_kit/grpo/multiturn.py",
             "    if alone == text:\n", "    if True:\n",
             ("tests/test_rollout_matrix.py", "-k",
              "after_an_added_token or (exact and mistral-sentencepiece-legacy)")),
    Mutation("the loss hides bridges from the model (completion_attention_mask dropped)", "prefill_kit/grpo/rollout.py",
             "attended = batch.completion_mask if batch.completion_attention_mask is None else "
             "batch.completion_attention_mask",
             "attended = batch.completion_mask",
             ("tests/test_multiturn_logps.py", "-k", "alone")),
    Mutation("the loss attends to padding", "prefill_kit/grpo/rollout.py",
             "attention_mask = torch.cat([batch.prompt_mask, attended], dim=1)",
             "attention_mask = torch.ones_like(input_ids)",
             ("tests/test_multiturn_logps.py", "-k", "alone")),
    Mutation("a tool worker whose call overran takes the next call", "prefill_kit/grpo/tools.py",
             "        _WORKERS.worker = None  # the next call gets a new worker; this one ends when the tool returns\n",
             "        pass\n",
             ("tests/test_tool_worker.py", "-k", "share_one_worker or does_not_block")),
    # issue 19: render speed (the sandbox's fast paths give and refuse what jinja's own path does)
    Mutation("the sandbox's dict fast path reads a dict method's name as an item", "templates/sandbox.py",
             "if kind is dict and attribute not in _DICT_ATTRIBUTES:", "if kind is dict:",
             ("tests/test_sandbox_fast_paths.py", "-k", "jinjas_getattr or jinjas_sandbox or refuses")),
    Mutation("the sandbox's plain-type fast path lets underscore attributes through", "templates/sandbox.py",
             'if kind in _PLAIN_ATTRIBUTE_TYPES and not attribute.startswith("_"):',
             "if kind in _PLAIN_ATTRIBUTE_TYPES:",
             ("tests/test_sandbox_fast_paths.py", "-k", "refuses")),
    Mutation("the sandbox's plain-type fast path returns str.format unsandboxed", "templates/sandbox.py",
             "if type(value) in _METHOD_TYPES:", "if False:",
             ("tests/test_sandbox_fast_paths.py", "-k", "jinjas_getattr")),
    Mutation("a filter with a size check skips it", "templates/sandbox.py",
             '_SIZED_FILTERS = frozenset({"replace", "format", "join", ',
             '_SIZED_FILTERS = frozenset({"replace", "format", ',
             ("tests/test_sandbox_growth.py", "-k", "join")),
    Mutation("the prefix overlap tries the shortest candidate first", "prefill_kit/prompts/render.py",
             "k = prefix.rfind(text[-1], 0, k) + 1", "k = prefix.find(text[-1], 0, k) + 1",
             ("tests/test_render_fast_paths.py",)),
    Mutation("a render pool interrupted while it starts keeps its workers", "prefill_kit/prompts/stream.py",
             "        if pool is not None:\n            pool.terminate()\n", "        pass\n",
             ("tests/test_pool_start_interrupt.py",)),

    # issue 19: ids routes (the margin rule, little recurring text unmeasured, decided once, inherited by workers)
    Mutation("the route margin rule inverted", "prefill_kit/prompts/tokens.py",
             'return "piecewise" if min(piecewise) < (1 - margin) * min(whole) else "whole"',
             'return "piecewise" if min(piecewise) < (1 + margin) * min(whole) else "whole"',
             ("tests/test_ids_route.py", "-k", "margin")),
    Mutation("the route is decided on the slowest rounds", "prefill_kit/prompts/tokens.py",
             'return "piecewise" if min(piecewise) < (1 - margin) * min(whole) else "whole"',
             'return "piecewise" if max(piecewise) < (1 - margin) * max(whole) else "whole"',
             ("tests/test_ids_route.py", "-k", "margin")),
    Mutation("little recurring text is measured anyway", "prefill_kit/prompts/tokens.py",
             "        if share < self.MARGIN:\n", "        if False:\n",
             ("tests/test_ids_route.py", "-k", "little_recurring")),
    Mutation("forked workers measure the route again", "prefill_kit/prompts/tokens.py",
             "if known is not None and known[0]() is self.tokenizer:", "if False:",
             ("tests/test_ids_route.py", "-k", "forked_workers or decided_once")),
    Mutation("the decided route ignores the template", "prefill_kit/prompts/tokens.py",
             "key = (id(self.tokenizer), recurring)", "key = (id(self.tokenizer), frozenset())",
             ("tests/test_ids_route.py", "-k", "decided_once")),
    Mutation("a pickled encoder measures its route again", "prefill_kit/prompts/tokens.py",
             "            self.route, self.route_reason = decided, reason\n", "            pass\n",
             ("tests/test_ids_route.py", "-k", "pickled")),
    Mutation("render_file's workers measure the ids route again", "prefill_kit/prompts/stream.py",
             "        decide_ids_route(renderer, chunk_records(first)[:renderer.calibration_rows])\n", "",
             ("tests/test_ids_route.py", "-k", "render_file")),
    Mutation("render_dataset's workers measure the ids route again", "prefill_kit/prompts/dataset.py",
             "        decide_ids_route(job.renderer, chunk_records(next(_chunks(data, 0, head, head))))\n", "",
             ("tests/test_ids_route.py", "-k", "render_dataset")),
    # issue 19: rendering overlaps tokenizing in one process
    Mutation("each chunk is finished before the next renders", "prefill_kit/prompts/stream.py",
             "                started = job.start(chunk)\n",
             "                started = (lambda done: lambda: done)(job.start(chunk)())\n",
             ("tests/test_render_overlap.py", "-k", "next_chunk_renders")),
    Mutation("a chunk rendered before a failing one is dropped", "prefill_kit/prompts/stream.py",
             "                    yield waiting()\n                raise\n",
             "                    waiting()\n                raise\n",
             ("tests/test_render_overlap.py", "tests/test_cli_render.py", "-k",
              "failing_one or stdout_is_not_atomic")),
    Mutation("the tokenizer keeps its own thread pool during the overlap", "prefill_kit/prompts/stream.py",
             "    with _tokenizers_single_threaded(), _collector_eased():\n        waiting = None\n",
             "    with _collector_eased():\n        waiting = None\n",
             ("tests/test_render_overlap.py", "-k", "single_threaded")),
    Mutation("slices the thread has not begun are waited for", "prefill_kit/prompts/batch.py",
             "        if self.ids is None and self.future.cancel():\n", "        if False:\n",
             ("tests/test_render_overlap.py", "-k", "not_begun")),
    Mutation("the caller waits for the thread instead of taking the next batch's slices",
             "prefill_kit/prompts/batch.py",
             "not piece.future.done() and self.renderer._take_last_waiting():\n",
             "not piece.future.done() and False:\n",
             ("tests/test_render_overlap.py", "-k", "tokenizes_the_next_batch")),
    Mutation("the caller takes the next batch's first waiting slice, where the thread goes next",
             "prefill_kit/prompts/batch.py",
             "            last = self._queued.pop()\n", "            last = self._queued.popleft()\n",
             ("tests/test_render_overlap.py", "-k", "tokenizes_the_next_batch")),
    Mutation("a forked worker submits to its parent's tokenizing thread", "prefill_kit/prompts/batch.py",
             "        if self._thread is None or self._thread_pid != os.getpid():\n",
             "        if self._thread is None:\n",
             ("tests/test_render_overlap.py", "-k", "forked_worker")),
    Mutation("workers fork with the parent's objects unfrozen", "prefill_kit/prompts/stream.py",
             "                gc.freeze()\n", "                pass\n",
             ("tests/test_render_overlap.py", "-k", "frozen")),
    Mutation("the parent's objects stay frozen after the fork", "prefill_kit/prompts/stream.py",
             "                    gc.unfreeze()\n", "                    pass\n",
             ("tests/test_render_overlap.py", "-k", "frozen")),
    Mutation("the render loop collects young objects at the default threshold", "prefill_kit/prompts/stream.py",
             "            gc.set_threshold(max(_saved_threshold[0], YOUNG_THRESHOLD), *_saved_threshold[1:])\n",
             "            gc.set_threshold(*_saved_threshold)\n",
             ("tests/test_render_overlap.py", "-k", "collector_skips")),
    Mutation("the render loop thaws the caller's own frozen objects", "prefill_kit/prompts/stream.py",
             "            _frozen_here = gc.get_freeze_count() == 0\n", "            _frozen_here = True\n",
             ("tests/test_render_overlap.py", "-k", "own_freeze")),
    Mutation("the first render loop to end restores the collector", "prefill_kit/prompts/stream.py",
             "            if _eased == 0:\n                gc.set_threshold(*_saved_threshold)\n",
             "            if True:\n                gc.set_threshold(*_saved_threshold)\n",
             ("tests/test_render_overlap.py", "-k", "own_freeze")),
    Mutation("render_dataset writes without the input's features", "prefill_kit/prompts/dataset.py",
             "        with ArrowWriter(features=self.data.features,", "        with ArrowWriter(features=None,",
             ("tests/test_render_overlap.py", "-k", "table_dataset_map_writes")),
    Mutation("render_dataset hands over prompt_ids as Arrow even where the input has its own",
             "prefill_kit/prompts/dataset.py",
             "        if \"prompt_ids\" in columns and \"prompt_ids\" not in self.data.features:\n",
             "        if \"prompt_ids\" in columns:\n",
             ("tests/test_render_overlap.py", "-k", "table_dataset_map_writes")),
    Mutation("render_dataset hands over prompt_ids as int32", "prefill_kit/prompts/dataset.py",
             "pa.list_(pa.int64())", "pa.list_(pa.int32())",
             ("tests/test_render_overlap.py", "-k", "table_dataset_map_writes")),
    Mutation("render_dataset's first shard waits for a worker instead of rendering here",
             "prefill_kit/prompts/stream.py",
             "        first = job(items[0])\n", "        first = pool.apply_async(_run_in_worker, (items[0],)).get()\n",
             ("tests/test_render_overlap.py", "-k", "first_shard_renders")),
    Mutation("render_dataset drops the input's format", "prefill_kit/prompts/dataset.py",
             "    return transmit_format(_render_table)(data, job)", "    return _render_table(data, job)",
             ("tests/test_render_overlap.py", "-k", "table_dataset_map_writes")),
    Mutation("datasets loads when render_dataset's module is imported", "prefill_kit/prompts/dataset.py",
             "logger = logging.getLogger(__name__)\n",
             "import datasets.arrow_dataset  # noqa: E402\nlogger = logging.getLogger(__name__)\n",
             ("tests/test_render_overlap.py", "-k", "leaves_datasets_unloaded")),
    Mutation("render_dataset holds a file-backed input's output in memory", "prefill_kit/prompts/dataset.py",
             "        if self.data.cache_files:\n", "        if False:\n",
             ("tests/test_render_overlap.py", "-k", "table_dataset_map_writes")),

]


def make_copy(root: Path) -> None:
    """The checkout as a test sees it, under `root`, with `../shared` beside it and the installed layout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for source, target in INSTALLED.items():
        shutil.copytree(root / source, root / target)
    if (REPO.parent / "shared").exists():
        (root.parent / "shared").symlink_to(REPO.parent / "shared")


def apply(root: Path, mutation: Mutation) -> None:
    paths = [mutation.path]
    for source, target in INSTALLED.items():
        if mutation.path.startswith(source + "/"):
            paths.append(target + mutation.path[len(source):])
    for name in paths:
        path = root / name
        text = path.read_text(encoding="utf-8")
        count = text.count(mutation.original)
        if count != 1:
            raise ListError(f"the original line occurs {count} times in {mutation.path}; update tests/mutations.py "
                            "to follow the code")
        path.write_text(text.replace(mutation.original, mutation.mutant), encoding="utf-8")


class ListError(Exception):
    """The list does not follow the code or the tests: an error in tests/mutations.py, not a catch or a miss."""


def pytest_env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "PYTHONDONTWRITEBYTECODE": "1"}


def copy_and_run(mutation: Mutation | None, args: list[str]) -> subprocess.CompletedProcess:
    """pytest with `args` in a fresh copy, `mutation` applied (None: unmutated)."""
    with tempfile.TemporaryDirectory(prefix=".prefill-kit-mutant-", dir=REPO.parent) as tmp:
        root = Path(tmp) / REPO.name  # same depth as the checkout: tests find ../shared alike
        make_copy(root)
        if mutation is not None:
            apply(root, mutation)
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=root,
                              env=pytest_env(root), capture_output=True, text=True)


def run(mutation: Mutation) -> tuple[str, float, str]:
    """('caught' | 'MISSED' | 'ERROR', seconds, last lines of pytest's output) for one mutation."""
    start = time.perf_counter()
    try:
        done = copy_and_run(mutation, ["-x", "-m", "not timing", *mutation.tests])
    except ListError as e:
        return "ERROR", time.perf_counter() - start, str(e)
    tail = "\n".join(done.stdout.strip().splitlines()[-3:])
    verdict = {0: "MISSED", 1: "caught"}.get(done.returncode, "ERROR")
    if verdict == "ERROR":  # 5: no test selected, 2-4: errors: the selection is broken
        tail = f"pytest exited {done.returncode}:\n{tail}\n{done.stderr.strip()[-1500:]}"
    return verdict, time.perf_counter() - start, tail


def selection(tests: tuple[str, ...]) -> tuple[list[str], str | None]:
    """A guard's pytest arguments as (paths or node ids, -k expression)."""
    paths, keyword, args = [], None, iter(tests)
    for arg in args:
        if arg == "-k":
            keyword = next(args)
        elif arg.startswith("-"):
            raise ListError(f"the unmutated check reads files, node ids and -k only, not {arg!r}")
        else:
            paths.append(arg)
    return paths, keyword


class Unmutated:
    """A pytest plugin: runs the union of the guards' selections once, and says which tests each selected
    (with pytest's own -k matching) and how each ended."""

    def __init__(self, guards: dict[str, tuple[str, ...]], out: str):
        self.guards, self.out = {name: selection(tests) for name, tests in guards.items()}, out
        self.selected: dict[str, list[str]] = {}
        self.outcomes: dict[str, str] = {}

    def pytest_collection_modifyitems(self, session, config, items):
        from _pytest.mark import KeywordMatcher
        from _pytest.mark.expression import Expression

        keep = set()
        for name, (paths, keyword) in self.guards.items():
            expression = Expression.compile(keyword) if keyword else None
            chosen = [item.nodeid for item in items
                      if any(item.nodeid == p or item.nodeid.startswith((p + "::", p + "[")) for p in paths)
                      and (expression is None or expression.evaluate(KeywordMatcher.from_item(item)))
                      and item.get_closest_marker("timing") is None]  # as `run` deselects them
            self.selected[name] = chosen
            keep.update(chosen)
        items[:] = [item for item in items if item.nodeid in keep]

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.outcomes[report.nodeid] = "failed" if report.when == "call" else f"error in {report.when}"
        elif report.skipped:
            self.outcomes.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, "passed")

    def pytest_sessionfinish(self, session):
        Path(self.out).write_text(json.dumps({"selected": self.selected, "outcomes": self.outcomes}))


def check_unmutated(chosen: list[Mutation]) -> dict[str, str]:
    """{mutation name: why its guard cannot show a catch} from one pytest session on the unmutated copy."""
    files = sorted({p.split("::")[0] for m in chosen for p in selection(m.tests)[0]})
    guards = {m.name: m.tests for m in chosen}
    with tempfile.TemporaryDirectory(prefix=".prefill-kit-mutant-", dir=REPO.parent) as tmp:
        root = Path(tmp) / REPO.name
        make_copy(root)
        out = Path(tmp) / "unmutated.json"
        runner = ("import json, sys; sys.path.insert(0, 'tests'); import pytest; from mutations import Unmutated; "
                  "guards, out, files = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]; "
                  "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *files], plugins=[Unmutated(guards, out)]))")
        done = subprocess.run([sys.executable, "-c", runner, json.dumps(guards), str(out), *files], cwd=root,
                              env=pytest_env(root), capture_output=True, text=True)
        if not out.exists():
            return {m.name: f"the unmutated run ended without a result (pytest exited {done.returncode}):\n"
                            f"{done.stdout[-1500:]}{done.stderr[-1500:]}" for m in chosen}
        found = json.loads(out.read_text())
    errors = {}
    for mutation in chosen:
        ids = found["selected"].get(mutation.name, [])
        bad = [f"{i}: {found['outcomes'].get(i, 'not run')}" for i in ids if found["outcomes"].get(i) != "passed"]
        if not ids:
            errors[mutation.name] = "its guard selects no test"
        elif bad and not SHARED_REFERENCE.exists() and all(found["outcomes"].get(i) in ("passed", "skipped")
                                                            for i in ids):
            errors[mutation.name] = (f"UNCHECKED: {SHARED_REFERENCE} is absent beside the checkout, and its guard "
                                     "needs that reference data (every test it selects skips or passes)")
        elif bad:
            errors[mutation.name] = "its guard does not pass unmutated: " + "; ".join(bad[:5])
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(m.name for m in MUTATIONS))
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations: {sorted(unknown)}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    start = time.perf_counter()
    errors = check_unmutated(chosen)
    print(f"unmutated guards checked ({time.perf_counter() - start:.0f} s)", flush=True)
    caught = unchecked = 0
    for mutation in chosen:
        if mutation.name in errors:
            unchecked = errors[mutation.name].startswith("UNCHECKED")
            verdict, seconds, tail = "UNCHECKED" if unchecked else "ERROR", 0.0, errors[mutation.name]
        else:
            verdict, seconds, tail = run(mutation)
        caught += verdict == "caught"
        unchecked += verdict == "UNCHECKED"
        print(f"{verdict}  {mutation.name}  ({seconds:.0f} s)", flush=True)
        if verdict != "caught":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    failed = len(chosen) - caught - unchecked
    print(f"{caught}/{len(chosen)} mutations caught" + (f" ({failed} missed or in error)" if failed else "")
          + (f" ({unchecked} unchecked: their guards need {SHARED_REFERENCE})" if unchecked else "")
          + f" in {time.perf_counter() - start:.0f} s")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
