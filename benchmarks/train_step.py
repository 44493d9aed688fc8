"""Benchmark: one GRPO optimizer step, prefill-kit's built-in backend vs TRL's `GRPOTrainer`, at equal work.

    python benchmarks/train_step.py [--steps 8] [--threads 1] [--hidden-size 32] [--layers 2] [--lora]

Both train the same tiny random Qwen2-style model (a few million parameters; the real Qwen2.5 vocabulary
from ../shared/reference/tokenizers/qwen2.5-instruct-DERIVED when present, else the tiny test tokenizer)
on the same rendered prompts (GSM8K questions when present, prefix "<think>\\n"), with the same
num_generations, max_completion_length, batch, learning rate and reward. A random model rarely emits EOS,
so both generate the full max_completion_length for every completion: equal work per step.

Each backend runs in its own child process (so that each peak RSS is its own), one after the other on
the same machine. Prints the median seconds per optimizer step (first step excluded: warm-up), the peak
RSS, the ratio builtin / TRL, and where the built-in step spends its time.

`--lora`: both train the same LoRA adapter (`LORA`, through `prefill_kit.grpo.policy.lora_config`) with
beta = BETA, so both take the reference log-probs from the model with its adapter switched off. A third
child, the built-in backend with the same adapter at beta = 0 (no reference at all), shows that the
reference costs no second copy of the weights: equal peak RSS, where a copy would add the model's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
QWEN_TOKENIZER = REFERENCE / "tokenizers" / "qwen2.5-instruct-DERIVED"
GSM8K = REFERENCE / "data" / "gsm8k" / "test.jsonl"
PREFIX = "<think>\n"
SETTINGS = {"num_generations": 4, "max_completion_length": 32, "per_device_train_batch_size": 16,
            "learning_rate": 1e-3}


LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
BETA = 0.04


def brevity(completions, completion_ids, **kwargs):
    return [1.0 - len(ids) / 32 for ids in completion_ids]


@dataclass
class Reward:
    name: str
    fn: object
    weight: float = 1.0


# ------------------------------------------------------------------------------------------------ setup


def build_model(out: Path, hidden_size: int, layers: int) -> str:
    """A random Qwen2 model with the Qwen2.5 tokenizer (or the tiny one); returns a description."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from prefill_kit.tiny_model import make_tiny_model

    if not QWEN_TOKENIZER.exists():
        make_tiny_model(out, hidden_size=hidden_size, num_layers=layers)
        return "tiny test tokenizer (vocab 400; ../shared/reference absent)"
    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return f"Qwen2.5 tokenizer (vocab {len(tokenizer)})"


def write_data(out: Path, rows: int = 64) -> str:
    if GSM8K.exists():
        lines = GSM8K.read_text(encoding="utf-8").splitlines()[:rows]
        questions = [json.loads(line)["question"] for line in lines]
        source = f"GSM8K test, first {rows} questions"
    else:
        questions = [f"What is {a} + {a * 7 % 13}?" for a in range(rows)]
        source = f"{rows} synthetic questions"
    out.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions), encoding="utf-8")
    return source


# ------------------------------------------------------------------------------------------- the children


def run_builtin(model_dir: Path, data: Path, out: Path, steps: int, lora: bool = False, beta: float = 0.0) -> dict:
    from prefill_kit.backends.builtin import train
    from prefill_kit.config import config_from_dict

    s = SETTINGS
    config = config_from_dict({
        "model": {"path": str(model_dir), "lora": LORA if lora else None},
        "data": {"path": str(data), "prefix": PREFIX},
        "grpo": {"num_generations": s["num_generations"], "max_completion_length": s["max_completion_length"],
                 "beta": beta},
        "train": {"learning_rate": s["learning_rate"], "per_device_train_batch_size": s["per_device_train_batch_size"],
                  "max_steps": steps, "seed": 0, "lr_scheduler_type": "constant"},
        "output": {"dir": str(out), "save_steps": 0}})
    profile = _profile_builtin()
    history = train(config, reward_funcs=[Reward("brevity", brevity)], progress=False).history
    return {"step_times": [r["step_time"] for r in history],
            "completion_length": statistics.mean(r["completion_length"] for r in history), "profile": profile}


def _profile_builtin() -> dict[str, float]:
    """Time the built-in step's phases by wrapping the functions the loop calls (no change to the loop)."""
    from prefill_kit.backends.builtin import loop

    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    loop.generate = timed("generate", loop.generate)
    loop.completion_logps = timed("forward (policy logps)", loop.completion_logps)
    loop.score_completions = timed("rewards", loop.score_completions)
    import accelerate

    accelerate.Accelerator.backward = timed("backward", accelerate.Accelerator.backward)
    return totals


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, lora: bool = False, beta: float = 0.0) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prefill_kit.config import LoraSection
    from prefill_kit.grpo.policy import lora_config
    from prefill_kit.prompts.dataset import render_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = render_dataset(str(data), tokenizer=tokenizer, prefix=PREFIX)
    dataset = dataset.select_columns(["prompt"])  # plain-text prompts: TRL applies no chat template
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

    lengths: list[float] = []

    class Lengths(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    s = SETTINGS
    args = GRPOConfig(output_dir=str(out), num_generations=s["num_generations"],
                      max_completion_length=s["max_completion_length"],
                      per_device_train_batch_size=s["per_device_train_batch_size"], learning_rate=s["learning_rate"],
                      lr_scheduler_type="constant", max_steps=steps, logging_steps=1, save_strategy="no",
                      report_to="none", seed=0, disable_tqdm=True, use_cpu=True, bf16=False, beta=beta,
                      gradient_checkpointing=False)  # TRL's default is on; the built-in run has it off
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          reward_funcs=[brevity], callbacks=[StepTimer(), Lengths()],
                          peft_config=lora_config(LoraSection(**LORA)) if lora else None)
    trainer.train()
    return {"step_times": step_times, "completion_length": statistics.mean(lengths) if lengths else None}


def child(backend: str, model_dir: Path, data: Path, out: Path, steps: int, threads: int, lora: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    beta = BETA if lora else 0.0
    if backend == "builtin-beta0":  # the same adapter without a reference
        result = run_builtin(model_dir, data, out, steps, lora=True, beta=0.0)
    else:
        result = (run_builtin if backend == "builtin" else run_trl)(model_dir, data, out, steps, lora=lora, beta=beta)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both backends")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help=f"both backends train a LoRA adapter {LORA}, beta {BETA}")
    parser.add_argument("--child", choices=("builtin", "trl", "builtin-beta0"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(args.dir)
        child(args.child, work / "model", work / "data.jsonl", work / f"run-{args.child}", args.steps, args.threads,
              args.lora)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer_note = build_model(work / "model", args.hidden_size, args.layers)
        data_note = write_data(work / "data.jsonl")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(work / "model")
        params = cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * (
            4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size)
        print(f"model: Qwen2, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, ~{params / 1e6:.1f}M params, "
              f"{tokenizer_note}; data: {data_note}")
        print(f"work per step: {SETTINGS['per_device_train_batch_size']} completions "
              f"({SETTINGS['num_generations']} per prompt) x up to {SETTINGS['max_completion_length']} tokens; "
              f"{args.steps} steps, torch threads {args.threads}"
              + (f"; both with LoRA {LORA}, beta {BETA}" if args.lora else ""))
        results = {}
        for backend in ("builtin", "trl", *(("builtin-beta0",) if args.lora else ())):
            proc = subprocess.run([sys.executable, __file__, "--child", backend, "--dir", str(work),
                                   "--steps", str(args.steps), "--threads", str(args.threads),
                                   *(["--lora"] if args.lora else [])],
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{backend} failed:\n{proc.stderr[-4000:]}")
            results[backend] = json.loads(line.removeprefix("RESULT "))

    medians = {}
    for backend, r in results.items():
        times = r["step_times"][1:] or r["step_times"]
        medians[backend] = statistics.median(times)
        print(f"{backend:<13} median {medians[backend]:.4f} s/step (min {min(times):.4f}, max {max(times):.4f}), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB, mean completion length {r['completion_length']:.1f}")
    ratio = medians["builtin"] / medians["trl"]
    rss = results["builtin"]["peak_rss_mib"] / results["trl"]["peak_rss_mib"]
    print(f"ratio builtin/TRL: time {ratio:.2f}x (target <= 0.80x), peak RSS {rss:.2f}x")
    if "builtin-beta0" in results:
        extra = results["builtin"]["peak_rss_mib"] - results["builtin-beta0"]["peak_rss_mib"]
        print(f"builtin LoRA, beta {BETA} vs 0 (the reference is the adapter switched off): peak RSS "
              f"{results['builtin']['peak_rss_mib'] / results['builtin-beta0']['peak_rss_mib']:.2f}x "
              f"({extra:+.0f} MiB; a reference copy would add {params * 4 / 2**20:.0f} MiB of fp32 weights)")
    profile = results["builtin"]["profile"]
    total = sum(results["builtin"]["step_times"])
    print("builtin step breakdown (all steps): " + ", ".join(
        f"{name} {100 * seconds / total:.0f}%" for name, seconds in sorted(profile.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
