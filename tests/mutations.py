"""Mutation check: each named one-line mutation of a critical line must make the tests that guard it fail.

    python tests/mutations.py            # every mutation; ends with "N/N mutations caught", exit 1 if any missed
    python tests/mutations.py --list     # names only
    python tests/mutations.py NAME ...   # some of them

Each mutation is applied to a temporary copy of the project laid out as it installs (`backends/` and
`templates/` inside `prefill_kit/`), made beside this checkout so that `../shared` resolves the same way,
and only the named test selection runs against it (the copy comes first on PYTHONPATH, for subprocesses
too). The checkout itself is never modified. A mutation whose original line is no longer in the code is
an error, not a pass: the list must follow the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = {"prefill_kit": "prefill_kit", "backends": "prefill_kit/backends", "templates": "prefill_kit/templates",
          "tests": "tests", "examples": "examples"}


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
             '"""For a worker\'s initializer or entry point: SIGINT does nothing in this process."""\n'
             "    signal.signal(signal.SIGINT, signal.SIG_IGN)",
             '"""For a worker\'s initializer or entry point: SIGINT does nothing in this process."""\n'
             "    signal.signal(signal.SIGINT, signal.default_int_handler)",
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
    Mutation("pool workers stay in the parent's process group", "prefill_kit/interrupts.py",
             "    os.setpgid(0, 0)\n", "    pass\n",
             ("tests/test_cli_interrupts.py", "-k", "sigterm_mid_render")),
    Mutation("preflight skips the held-out eval check", "prefill_kit/runs/checks.py",
             "        check_eval_held_out(config.data.path, config.data.eval_path)\n", "",
             ("tests/test_preflight.py", "-k", "training_data_as_train")),
    Mutation("reward never warns about a doubled prefix", "prefill_kit/cli/reward.py",
             "        if doubled * 2 > total:\n", "        if False:\n",
             ("tests/test_cli_messages.py", "-k", "reward_warns")),
]


def make_copy(root: Path) -> None:
    """The project as it installs, under `root`."""
    for source, target in LAYOUT.items():
        shutil.copytree(REPO / source, root / target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")


def apply(root: Path, mutation: Mutation) -> None:
    source = mutation.path
    for prefix, target in LAYOUT.items():
        if source.startswith(prefix + "/"):
            source = target + source[len(prefix):]
            break
    path = root / source
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.original)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name!r}: the original line occurs {count} times in {mutation.path}; "
                         "update tests/mutations.py to follow the code")
    path.write_text(text.replace(mutation.original, mutation.mutant), encoding="utf-8")


def run(mutation: Mutation) -> tuple[bool, float, str]:
    """(caught, seconds, last lines of pytest's output) for one mutation."""
    with tempfile.TemporaryDirectory(prefix=".prefill-kit-mutant-", dir=REPO.parent) as tmp:
        root = Path(tmp) / REPO.name  # same depth as the checkout: tests find ../shared alike
        make_copy(root)
        apply(root, mutation)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *mutation.tests], cwd=root, env=env, capture_output=True, text=True)
        tail = "\n".join(done.stdout.strip().splitlines()[-3:])
        if done.returncode not in (0, 1):  # 5: no test selected, 2-4: errors: the selection is broken
            raise SystemExit(f"mutation {mutation.name!r}: pytest exited {done.returncode}:\n{tail}\n{done.stderr}")
        return done.returncode == 1, time.perf_counter() - start, tail


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
    caught = 0
    for mutation in chosen:
        was_caught, seconds, tail = run(mutation)
        caught += was_caught
        print(f"{'caught' if was_caught else 'MISSED'}  {mutation.name}  ({seconds:.0f} s)", flush=True)
        if not was_caught:
            print("    " + tail.replace("\n", "\n    "), flush=True)
    print(f"{caught}/{len(chosen)} mutations caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
