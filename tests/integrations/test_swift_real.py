"""The ms-swift plugin against ms-swift 4.6.0 itself, run in CI's ms-swift venv (.ci/run).

ms-swift loads the plugin with its own `import_external_file` (what `--external_plugins` does), builds each ORM
as its GRPO trainer does (`orms[name](args=GRPOConfig)`) and scores through `compute_rewards_per_func`, the
function the trainer calls, with completions decoded by ms-swift's own template with `response_prefix`.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import pytest

pytest.importorskip("swift", reason="needs ms-swift==4.6.0 (CI's ms-swift venv, see .ci/run)")

from tests.conftest import SHARED_REFERENCE  # noqa: E402

QWEN25 = SHARED_REFERENCE / "tokenizers" / "qwen2.5-instruct-DERIVED"


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

    return GRPOConfig(output_dir=str(tmp_path_factory.mktemp("swift")), use_cpu=True, bf16=False)


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
                          extra={"solution": solution}, response_token_ids=[ids])
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


def test_length_rewards_count_swifts_generated_token_ids(orms, args, template):
    ids, completion = generated(template, "7\n</think>\n<answer>7</answer>")
    (soft,) = orms["prefill_kit_soft_overlong"](args=args)([completion], response_token_ids=[[ids]])
    assert soft == 0.0  # len(ids) is far below the default max_completion_len
    reward = orms["prefill_kit_cosine_length"](args=args)
    (long_right,) = reward([completion], response_token_ids=[[ids * 200]], solution=["7"])
    (short_right,) = reward([completion], response_token_ids=[[ids]], solution=["7"])
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
