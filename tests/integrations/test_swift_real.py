"""The ms-swift plugin against ms-swift 4.6.0 itself, run in CI's ms-swift venv (.ci/run).

First a real `swift rlhf --rlhf_type grpo` run, launched with the line `prefill-kit integrations swift` prints
(plus CPU and tiny-size options): 2 steps on CPU with a tiny random model; its logged reward columns must equal
prefill-kit's own scores of its logged completions. Then the finer cases: ms-swift loads the plugin with its own
`import_external_file`, builds each ORM as its GRPO trainer does (`orms[name](args=GRPOConfig)`) and scores through
`compute_rewards_per_func`, with completions decoded by ms-swift's own template with `response_prefix`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("swift", reason="needs ms-swift==4.6.0 (CI's ms-swift venv, see .ci/run)")

from tests.conftest import REPO, SHARED_REFERENCE  # noqa: E402

QWEN25 = SHARED_REFERENCE / "tokenizers" / "qwen2.5-instruct-DERIVED"
EXAMPLE = REPO / "examples" / "math_tiny.jsonl"
PREFIX = "<think>\n"
REWARDS = "format,accuracy:2,soft_overlong,tag_count"  # tag_count gives random text partial credit for <think>\n
MAX_COMPLETION, SOFT_MAX, SOFT_CACHE = 16, 20, 8  # every completion runs to 16 tokens: soft_overlong is -0.5
# What the real run adds to the printed launch line: the tiny local model's type and template (ms-swift cannot
# guess them from a local directory), CPU-only, no vLLM, a tiny batch, 2 steps, every step logged, nothing saved.
CPU_TINY = ["--model_type", "qwen2", "--template", "qwen2_5", "--use_hf", "true", "--torch_dtype", "float32",
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length",
            str(MAX_COMPLETION), "--soft_max_length", str(SOFT_MAX), "--soft_cache_length", str(SOFT_CACHE),
            "--max_steps", "2", "--logging_steps", "1", "--log_completions", "true", "--save_strategy", "no",
            "--report_to", "none", "--dataset_num_proc", "1", "--split_dataset_ratio", "0", "--seed", "0"]


def cli(*args: str) -> str:
    from prefill_kit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory) -> Path:
    """A real `swift rlhf` GRPO run as `prefill-kit integrations swift` prints it; returns its logging directory."""
    work = tmp_path_factory.mktemp("swift-run")
    model = work / "tiny"
    cli("make-tiny-model", str(model), "--template", "qwen2.5")
    launch = cli("integrations", "swift", "--model", str(model), "--dataset", str(EXAMPLE), "--rewards", REWARDS,
                 "--prefix", r"<think>\n").splitlines()[-1]
    words = shlex.split(launch)
    assert words[:2] == ["swift", "rlhf"]
    words[0] = str(Path(sys.executable).with_name("swift"))  # this venv's ms-swift
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*words, *CPU_TINY, "--output_dir", str(work / "out")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (run_dir,) = (work / "out").iterdir()
    return run_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_a_real_swift_grpo_run_logs_prefill_kits_own_scores_of_its_completions(grpo_run, orms):
    from prefill_kit.rewards import get_reward, parse_reward_spec
    from prefill_kit.rewards.length import soft_overlong_value

    steps = [s for s in read_jsonl(grpo_run / "logging.jsonl") if "completions/mean_length" in s]
    assert len(steps) == 2
    # ms-swift's own length metrics: every completion ran to the limit, so each one's generated length is known.
    assert all(s["completions/min_length"] == s["completions/max_length"] == MAX_COMPLETION for s in steps)

    tables = read_jsonl(grpo_run / "completions.jsonl")
    tables = [t for i, t in enumerate(tables) if t not in tables[:i]]  # the end of training logs the last again
    rows = [dict(zip(table, values, strict=True)) for table in tables for values in zip(*table.values(), strict=True)]
    assert len(rows) == 2 * 2  # 2 steps x 2 generations
    spec = parse_reward_spec(REWARDS)
    column = {r.name: orms[f"prefill_kit_{r.name}"].__name__ for r in spec}  # ms-swift logs the ORM class name
    for row in rows:
        completion = row["completion"]
        assert completion.startswith(PREFIX) and not completion.startswith(PREFIX * 2)  # ms-swift put it back once
        # prefill-kit's own rewards on the same response: what the model sampled after the prefill, plus the prefix.
        sampled = completion[len(PREFIX):]
        expected = {name: get_reward(name)([sampled], prefix=[PREFIX], solution=[row["solution"]])[0]
                    for name in ("format", "accuracy", "tag_count")}
        expected["soft_overlong"] = soft_overlong_value(MAX_COMPLETION, SOFT_MAX, SOFT_CACHE)
        assert {name: row[column[name]] for name in column} == expected, completion
    assert expected["soft_overlong"] == -0.5 and any(row[column["tag_count"]] > 0 for row in rows)
    # The total is ms-swift's weighted sum with the printed --reward_weights (accuracy counts twice).
    for number, step in enumerate(steps, start=1):
        step_rows = [row for row in rows if int(row["step"]) == number]
        total = sum(r.weight * row[column[r.name]] for row in step_rows for r in spec) / len(step_rows)
        assert step["reward"] == pytest.approx(total)


@pytest.fixture(scope="module")
def orms():
    from swift.rewards import orms
    from swift.utils import import_external_file

    from prefill_kit.cli.integrations import plugin_path

    path = plugin_path()
    import_external_file(path)
    # The plugin takes its directory (which holds the verl adapter, verl.py) back off sys.path.
    assert os.path.dirname(path) not in [os.path.abspath(p or ".") for p in sys.path]
    return orms


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    from swift.rlhf_trainers import GRPOConfig

    return GRPOConfig(output_dir=str(tmp_path_factory.mktemp("swift")), use_cpu=True, bf16=False,
                      max_completion_length=64, soft_cache_length=16)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """ms-swift's own qwen2_5 template with `--response_prefix '<think>\\n'` (ms-swift decodes the `\\n`)."""
    from swift.model import get_processor
    from swift.template import get_template
    from transformers import Qwen2Config

    out = tmp_path_factory.mktemp("model")
    if QWEN25.is_dir():
        shutil.copytree(QWEN25, out, dirs_exist_ok=True)
    else:
        from prefill_kit.templates import load_template
        from prefill_kit.tiny_model import build_tokenizer

        build_tokenizer(chat_template=load_template("qwen2.5").source).save_pretrained(out)
    Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, architectures=["Qwen2ForCausalLM"]).save_pretrained(out)
    processor = get_processor(str(out), model_type="qwen2", download_model=False, use_hf=True)
    return get_template(processor, template_type="qwen2_5", response_prefix="<think>\n")


def test_the_plugin_registers_one_orm_per_reward(orms):
    from prefill_kit.rewards import available_rewards

    names = {name for name in orms if name.startswith("prefill_kit_")}
    assert names == {f"prefill_kit_{r}" for r in available_rewards()}
    assert {"prefill_kit_format", "prefill_kit_accuracy", "prefill_kit_think_format"} <= names
    assert orms["format"].__module__.startswith("swift")  # ms-swift's own ORMs stay


def generated(template, text: str):
    """What the model generated as token ids, and the completion ms-swift decodes from them."""
    tokenizer = template.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids, template.decode_generate_ids(ids, template_inputs=None)


def score(orms, args, names, completions, solutions, response_token_ids):
    """The trainer's path: ORMs built with args, called by compute_rewards_per_func on GRPO samples."""
    import torch
    from swift.rl_core.data import GRPOSample
    from swift.rl_core.grpo_algorithm import compute_rewards_per_func

    funcs = [orms[name](args=args) for name in names]
    samples = [GRPOSample(messages=[{"role": "user", "content": "Tom has 12 apples and gives 5 away. How many left?"},
                                    {"role": "assistant", "content": completion}],
                          extra={"solution": solution}, response_token_ids=ids)  # single-turn: flat
               for completion, solution, ids in zip(completions, solutions, response_token_ids, strict=True)]
    return compute_rewards_per_func(samples, funcs, None, device=torch.device("cpu")).tolist()


def test_completions_decoded_by_swift_hold_the_prefix_once_and_score_as_full_responses(orms, args, template):
    right_ids, right = generated(template, "12 - 5 = 7\n</think>\n<answer>7</answer>")
    wrong_ids, wrong = generated(template, "12 + 5 = 17\n</think>\n<answer>17</answer>")
    assert right == "<think>\n12 - 5 = 7\n</think>\n<answer>7</answer>"  # ms-swift put the prefix back
    rewards = score(orms, args, ["prefill_kit_format", "prefill_kit_accuracy", "prefill_kit_think_format"],
                    [right, wrong], ["7", "7"], [right_ids, wrong_ids])
    assert rewards == [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]


@pytest.mark.parametrize("prefix", ["<think>\n", "Answer: "])
def test_a_prefix_column_is_not_prepended_again(orms, args, template, prefix):
    # ms-swift passes every dataset column; a `prefix` column (e.g. from `prefill-kit render`) must not be put in
    # front of a completion that already holds ms-swift's prefix.
    ids, completion = generated(template, "7\n</think>\n<answer>7</answer>")
    reward = orms["prefill_kit_format"](args=args)
    assert reward([completion], prefix=[prefix], solution=["7"]) == [1.0]


@pytest.mark.parametrize("shape", ["single-turn (flat)", "per-turn"])
def test_length_rewards_count_swifts_generated_token_ids(orms, args, template, shape):
    ids, completion = generated(template, "7\n</think>\n<answer>7</answer>")
    as_swift = (lambda ids: ids) if shape.startswith("single") else (lambda ids: [ids[:3], ids[3:]])
    soft_overlong = orms["prefill_kit_soft_overlong"](args=args)  # ms-swift's window: 64 tokens, the last 16 punished
    (short,) = soft_overlong([completion], response_token_ids=[as_swift(ids)])
    (at_limit,) = soft_overlong([completion], response_token_ids=[as_swift((ids * 64)[:64])])
    assert (short, at_limit) == (0.0, -1.0)
    (inside,) = soft_overlong([completion], response_token_ids=[as_swift((ids * 64)[:52])])
    assert inside == -0.25  # 4 tokens into the 16-token window
    reward = orms["prefill_kit_cosine_length"](args=args)
    (long_right,) = reward([completion], response_token_ids=[as_swift(ids * 200)], solution=["7"])
    (short_right,) = reward([completion], response_token_ids=[as_swift(ids)], solution=["7"])
    assert short_right > long_right  # lengths come from the ids: same text, different scores


def test_a_row_the_reward_cannot_judge_becomes_nan_in_swift(orms, args, template):
    ids, completion = generated(template, "7\n</think>\n<answer>7</answer>")
    ((value,),) = score(orms, args, ["prefill_kit_accuracy"], [completion], [None], [ids])
    assert math.isnan(value)


def test_swifts_template_with_response_prefix_encodes_prefill_kits_prompt_ids(template):
    """So `prefill-kit render --check-tokens` with the same tokenizer and prefix answers for ms-swift too."""
    import json

    from prefill_kit.prompts.dataset import render_dataset
    from tests.conftest import REPO

    example = REPO / "examples" / "math_tiny.jsonl"
    rows = [json.loads(line) for line in open(example, encoding="utf-8")]
    rendered = render_dataset(str(example), None, template.tokenizer, "<think>\n")
    assert [template.encode({"messages": row["messages"]})["input_ids"] for row in rows] == rendered["prompt_ids"]
