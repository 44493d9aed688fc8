"""`prefill-kit train CONFIG`: GRPO training from one YAML config, with the built-in or the TRL backend.

Runs unchanged under `accelerate launch` (e.g. `accelerate launch --num_processes 2 -m prefill_kit train CONFIG`).
The config schema is documented in `prefill_kit.config`.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train with GRPO from a YAML config", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML training config")
    p.add_argument("--backend", help="override the config's `backend:` (builtin, trl)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 --set grpo.beta=0.04 "
                        "(VALUE is parsed as YAML); repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run in output.dir first (output.overwrite: true); without it a new run "
                        "refuses a directory that holds another run's files")
    p.set_defaults(func=run)
    return p


def load_backend(name: str):
    """The backend module `prefill_kit.backends.<name>`; each exposes `train(config, ...)`."""
    import importlib

    from prefill_kit.errors import ConfigError

    try:
        return importlib.import_module(f"prefill_kit.backends.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"prefill_kit.backends.{name}":
            raise ConfigError(f"backend: {name!r} is not available in this installation") from None
        raise


def run(args: argparse.Namespace) -> int:
    import os

    from prefill_kit.config import load_config
    from prefill_kit.extras import require_train

    require_train("prefill-kit train", ("torch", "accelerate", "trl"))

    overrides = list(args.overrides) + ([f"backend={args.backend}"] if args.backend else [])
    overrides += ["output.overwrite=true"] if args.overwrite else []
    config = load_config(args.config, overrides)
    # Like `python -m`, let `module:function` rewards and modules next to the config's user resolve.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from prefill_kit.runs.checks import check_rewards_of

    check_rewards_of(args.config, config.rewards)
    backend = load_backend(config.backend)
    if lone_cpu_launch(os.environ):
        wanted = launcher_num_processes(os.getppid())
        if wanted:
            # accelerate's CPU launcher starts N processes only through mpirun; start the other N-1 the way
            # `accelerate launch --multi_gpu` would (torchrun), and they join over gloo.
            print(f"prefill-kit train: `accelerate launch --cpu` started one process of {wanted}; "
                  f"relaunching with torch.distributed.run --nproc_per_node {wanted}", file=sys.stderr)
            import subprocess

            return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(wanted),
                                    "--master_port", os.environ.get("MASTER_PORT", "29500"),
                                    "-m", "prefill_kit", *sys.argv[1:]])
        print("prefill-kit train: warning: `accelerate launch --cpu` started only this one process (without MPI, "
              "accelerate's CPU launcher cannot start more); for N processes on CPU use "
              "`accelerate launch --multi_gpu --num_processes N ...`, which joins them over gloo", file=sys.stderr)
    from accelerate import PartialState

    from prefill_kit.cli.quiet import library_chatter_off

    try:
        with library_chatter_off():
            backend.train(config)
    except KeyboardInterrupt as exc:
        from prefill_kit.interrupts import Terminated

        stopped = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    else:
        if PartialState().is_main_process:
            print(run_summary(config), file=sys.stderr)
        return 0
    # Out of the except block, the interrupted frames are released; collecting them closes their progress bars
    # now, so the bars' last lines come before this one, not after it.
    import gc

    gc.collect()
    if os.environ.get("RANK", "0") == "0":  # not PartialState(): no collective calls on the way out
        print(f"prefill-kit train: {stopped[0]}; {resume_hint(config.output.dir)}", file=sys.stderr)
    return stopped[1]


def resume_hint(run_dir: str) -> str:
    """Where an interrupted run can continue from: its last whole checkpoint, if it wrote one."""
    from prefill_kit.runs.session import last_checkpoint

    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        return f"no checkpoint was written in {run_dir} (one is written every output.save_steps steps)"
    return f"the last checkpoint is {checkpoint}; continue with --set output.resume_from={run_dir}"


def lone_cpu_launch(env) -> bool:
    """True when `accelerate launch --cpu --num_processes N>1` ran us alone: it sets MASTER_ADDR for N > 1
    but, lacking mpirun, starts a single process with no WORLD_SIZE."""
    return env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and "WORLD_SIZE" not in env


def launcher_num_processes(pid: int) -> int | None:
    """The `--num_processes N` (N > 1) on the launching `accelerate launch` command line, if it is readable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(arg == "launch" or arg.endswith(("accelerate.commands.launch", "accelerate-launch")) for arg in argv):
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = argv[i + 1] if arg == flag and i + 1 < len(argv) else arg.removeprefix(flag + "=")
            if (arg == flag or arg.startswith(flag + "=")) and value.isdigit() and int(value) > 1:
                return int(value)
    return None


def run_summary(config) -> str:
    """One line from the run's metrics.jsonl, the same for every backend."""
    import json
    from pathlib import Path

    run_dir = Path(config.output.dir)
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]  # eval rows hold only `eval/...` metrics
    last = train_rows[-1] if train_rows else {}
    parts = [f"{config.backend} backend: {last.get('step', 0)} steps"]
    parts += [f"{k} {last[k]:.4g}" for k in ("reward", "loss", "completion_length") if isinstance(last.get(k), float)]
    eval_rows = [r for r in rows if "eval/reward" in r]
    if eval_rows and isinstance(eval_rows[-1]["eval/reward"], float):
        parts.append(f"eval/reward {eval_rows[-1]['eval/reward']:.4g}")
    return "; ".join(parts) + f"; model and metrics.jsonl in {run_dir}"
