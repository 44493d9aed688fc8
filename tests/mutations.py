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
INSTALLED = {"backends": "prefill_kit/backends", "templates": "prefill_kit/templates"}  # where they install


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # as in the checkout
    original: str  # must occur exactly once in the file
    mutant: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids or -k expressions


MUTATIONS = [
    Mutation("generate returns an all-ones completion mask", "backends/builtin/rollout.py",
             "completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)\n",
             "completion_mask = torch.ones_like(completion_ids)\n",
             ("tests/test_builtin_train.py", "-k", "generate_masks")),
    Mutation("every rank takes the same prompts", "backends/builtin/loop.py",
             "process_index=rank, num_processes=world,", "process_index=0, num_processes=world,",
             ("tests/test_builtin_train.py", "-k", "two_cpu_processes")),
    Mutation("the shard start ignores the rank", "backends/builtin/data.py",
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
    Mutation("the piecewise tokenizer drops the added tokens", "prefill_kit/prompts/prompt_tokens.py",
             "self._added_lists = {t: [i] for t, i in added.items()}",
             "self._added_lists = {t: [] for t, i in added.items()}",
             ("tests/test_prompt_tokens.py", "-k", "random_text and qwen")),
    Mutation("the piecewise tokenizer drops a piece's last token", "prefill_kit/prompts/prompt_tokens.py",
             "ids.update(zip(group, (e.ids for e in encoded), strict=True))",
             "ids.update(zip(group, (e.ids[:-1] for e in encoded), strict=True))",
             ("tests/test_prompt_tokens.py", "-k", "random_text and gpt2")),
    Mutation("Metaspace 'first' applied to every piece", "prefill_kit/prompts/prompt_tokens.py",
             "self._rest = rest_backend(backend)", "self._rest = backend",
             ("tests/test_prompt_tokens.py", "-k", "metaspace_first_prepends")),
    Mutation("the start-of-text piece encoded as any other", "prefill_kit/prompts/prompt_tokens.py",
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
    Mutation("rendered input is wrapped again", "prefill_kit/prompts/pipeline.py",
             "return _rendered_row(row, options, opening)", "pass",
             ("tests/test_prefix_contract.py", "-k", "rendered")),
    Mutation("the exact-ids tokenizer adds special tokens", "prefill_kit/prompts/prompt_tokens.py",
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
    Mutation("the loss covers prefix tokens", "backends/builtin/rollout.py",
             "completion_ids = out[:, ids.size(1):]  # (B, C)", "completion_ids = out[:, ids.size(1) - 2:]",
             ("tests/test_builtin_train.py", "-k", "generate_masks or only_completion_positions")),
    Mutation("resume loses the scheduler", "backends/builtin/loop.py",
             "accelerator.register_for_checkpointing(scheduler, state)",
             "accelerator.register_for_checkpointing(state)",
             ("tests/test_builtin_train.py", "-k", "resume")),
    Mutation("the sandbox base class is a plain Environment", "templates/sandbox.py",
             "class _Sandbox(ImmutableSandboxedEnvironment):", "class _Sandbox(jinja2.Environment):",
             ("tests/test_templates_loader.py",)),
    Mutation("a clean run keeps a stale rejects file", "prefill_kit/prompts/render_file.py",
             "Path(reject_file).unlink(missing_ok=True)", "pass",
             ("tests/test_render_files.py", "-k", "stale")),
    Mutation("PyYAML's 1e-5 stays a string", "prefill_kit/config.py",
             'Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML12_FLOAT), list("-+0123456',
             'pass  # "-+0123456',
             ("tests/test_config.py", "-k", "float_spelling")),
    Mutation("paths are not checked before the model loads", "backends/builtin/loop.py",
             "    check_paths(config)\n", "    pass\n",
             ("tests/test_run_checks.py", "-k", "fail_before_anything_loads and builtin")),
    Mutation("a new run does not see the old run's files", "prefill_kit/runs/run_dir.py",
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
    Mutation("the verl export pairs rows with rejected records", "prefill_kit/integrations/verl_export.py",
             "    if not rejects:\n        return records\n", "    return records\n",
             ("tests/test_verl_export.py", "-k", "aligned")),
    Mutation("train starts without checking the [train] extra", "prefill_kit/cli/train.py",
             'require_train("prefill-kit train", ("torch", "accelerate", "trl"))', "pass",
             ("tests/test_extras.py",)),
    # trackers and evaluation during training (issue 12)
    Mutation("trackers get their own metric names", "backends/builtin/loop.py",
             'accelerator.log(tracker_values(row), step=row["step"])',
             'accelerator.log({"train/" + k: v for k, v in tracker_values(row).items()}, step=row["step"])',
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
    Mutation("plot legends sit over the curves", "prefill_kit/runs/plotting.py",
             'ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)',
             "ax.legend(fontsize=7)", ("tests/test_plot.py", "-k", "legends")),
    Mutation("the TRL backend prints a metrics dict per step", "backends/trl.py",
             "if self.pop_callback(ProgressCallback) is not None:", "if False:",
             ("tests/test_backends.py", "-k", "metric_keys")),
    Mutation("GSPO's sequence weight is a sum, not a length-normalised mean", "backends/builtin/loss.py",
             "return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)",
             "return (log_ratio * mask).sum(-1).unsqueeze(-1)",
             ("tests/test_grpo_math.py", "-k", "sequence_level")),
    Mutation("cispo's clamped weight carries a gradient", "backends/builtin/loss.py",
             "return -torch.clamp(coef, max=epsilon_high).detach() * advantages * logps",
             "return -torch.clamp(coef, max=epsilon_high) * advantages * logps",
             ("tests/test_grpo_math.py", "-k", "cispo")),
    Mutation("cispo is divided by the accumulation steps", "backends/builtin/loss.py",
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
    # issue 21: the sandbox's limits are checked before the value is built, and in loops without calls
    Mutation("+ between strings is not size-checked", "templates/sandbox.py",
             "            if isinstance(left, str | list | tuple) and type(left) is type(right):\n"
             "                _check_size_of(len(left) + len(right), left)\n"
             "            return _check_size(left + right)\n",
             "            return left + right\n",
             ("tests/test_sandbox_growth.py", "-k", "plus")),
    Mutation("int * str is checked only after it is built", "templates/sandbox.py",
             "            _check_repeat(right, left)\n", "            pass\n",
             ("tests/test_sandbox_growth.py", "-k", "times and int and str")),
    Mutation("loops without a call stop checking the wall clock", "templates/sandbox.py",
             "            if not budget.iterations % 256:\n                budget.check_time()\n",
             "            pass\n",
             ("tests/test_sandbox_growth.py", "-k", "wall_clock and without")),
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
        done = copy_and_run(mutation, ["-x", *mutation.tests])
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
                      and (expression is None or expression.evaluate(KeywordMatcher.from_item(item)))]
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
    caught = 0
    for mutation in chosen:
        if mutation.name in errors:
            verdict, seconds, tail = "ERROR", 0.0, errors[mutation.name]
        else:
            verdict, seconds, tail = run(mutation)
        caught += verdict == "caught"
        print(f"{verdict}  {mutation.name}  ({seconds:.0f} s)", flush=True)
        if verdict != "caught":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    failed = len(chosen) - caught
    print(f"{caught}/{len(chosen)} mutations caught" + (f" ({failed} missed or in error)" if failed else "")
          + f" in {time.perf_counter() - start:.0f} s")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
