"""`prefill-kit export verl` and `compute_score` against verl 0.9.1 itself, run in CI's verl venv (.ci/run).

verl's own code does each step: Hydra composes `verl_overrides.yaml` onto verl's `ppo_trainer` config,
`HFModelConfig` loads the tokenizer and applies `custom_chat_template`, `RLHFDataset` loads `train.parquet`, the
agent loop's Continuous Token builder turns `raw_prompt` into prompt ids, and the naive reward manager scores a
response through `get_custom_reward_fn`. The ids must equal `prefill-kit render`'s `prompt_ids`.

The whole rollout-and-reward path also runs as the trainer drives it: verl's `collate_fn` batches
`RLHFDataset` items, the batch is repeated per rollout, verl's `AgentLoopWorker` runs its single-turn agent loop
(Continuous Token prompt ids, padding, masks) and streams each sample to verl's `RewardLoopWorker`, whose reward
manager calls prefill-kit's `compute_score`. Only the generation server is scripted (verl generates with vLLM or
SGLang, which need a GPU; so does the actor update), and ray is left out: the reward worker is called in process.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("verl", reason="needs verl==0.9.1 (CI's verl venv, see .ci/run)")

from tests.conftest import REPO, SHARED_REFERENCE  # noqa: E402

EXAMPLE = REPO / "examples" / "math_tiny.jsonl"
QWEN25 = SHARED_REFERENCE / "tokenizers" / "qwen2.5-instruct-DERIVED"
GSM8K = SHARED_REFERENCE / "data" / "gsm8k" / "test.jsonl"


def prefill_kit(*args: str) -> None:
    """The CLI, in this process (a fresh interpreter per call would import transformers again, slowly)."""
    from prefill_kit.cli import main

    assert main(list(args)) == 0


_MODELS: dict[str, str] = {}


def model_dir(tmp_path_factory, tokenizer_source) -> str:
    """A model directory verl's HFModelConfig accepts: the tokenizer plus a (weightless) Qwen2 config.
    Built once per tokenizer."""
    from transformers import Qwen2Config

    key = str(tokenizer_source)
    if key in _MODELS:
        return _MODELS[key]
    out = tmp_path_factory.mktemp("model")
    if callable(tokenizer_source):
        tokenizer_source().save_pretrained(out)
    else:
        shutil.copytree(tokenizer_source, out, dirs_exist_ok=True)
    Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, architectures=["Qwen2ForCausalLM"]).save_pretrained(out)
    _MODELS[key] = str(out)
    return str(out)


def verl_config(directory):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(directory), version_base=None):
        return compose(config_name="verl_overrides")


def verl_prompt_ids(config) -> tuple[list[list[int]], object, object]:
    """Each row's prompt ids as verl makes them, with the tokenizer and a dataset item for the reward check."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    model = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    dataset = RLHFDataset(data_files=config.data.train_files, tokenizer=model.tokenizer, config=config.data,
                          processor=model.processor)
    builder = create_continuous_token_builder(model.tokenizer, hf_model_type=model.hf_config.model_type,
                                              chat_template_kwargs=config.data.get("apply_chat_template_kwargs", {}),
                                              processor=model.processor)
    items = [dataset[i] for i in range(len(dataset))]
    return [builder.build_initial_tokens(list(item["raw_prompt"])) for item in items], model, items


def tiny():
    from prefill_kit.templates import load_template
    from prefill_kit.tiny_model import build_tokenizer

    return build_tokenizer(chat_template=load_template("qwen2.5").source)


TOKENIZERS = [pytest.param(QWEN25, id="qwen2.5"), pytest.param(tiny, id="tiny-local")]


@pytest.mark.parametrize("tokenizer, prefix", [pytest.param(QWEN25, r"<think>\n", id="qwen2.5"),
                                               pytest.param(QWEN25, r"<think>\n\nLet me", id="qwen2.5-merging-prefix"),
                                               pytest.param(tiny, r"<think>\n", id="tiny-local")])
def test_verl_tokenizes_every_exported_row_into_prefill_kits_prompt_ids(tmp_path, tmp_path_factory, tokenizer, prefix):
    if not callable(tokenizer) and not tokenizer.is_dir():
        pytest.skip(f"needs {tokenizer} (../shared/reference)")
    model = model_dir(tmp_path_factory, tokenizer)
    prefill_kit("render", str(EXAMPLE), "-o", str(tmp_path / "rendered.jsonl"), "--tokenizer", model,
                "--prefix", prefix)
    prefill_kit("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out"), "--tokenizer", model, "--prefix", prefix)
    expected = [json.loads(line)["prompt_ids"] for line in open(tmp_path / "rendered.jsonl", encoding="utf-8")]

    config = verl_config(tmp_path / "out")
    assert config.actor_rollout_ref.model.path == model
    assert config.actor_rollout_ref.rollout.name == "vllm"  # verl's ppo_trainer leaves it mandatory (`???`)
    ids, _, items = verl_prompt_ids(config)
    assert len(ids) == len(expected) == 32  # none filtered as too long: max_prompt_length is the longest prompt
    assert ids == expected
    assert config.data.max_prompt_length == max(map(len, expected))


def test_a_template_holding_an_omegaconf_interpolation_reaches_verl_verbatim(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{# costs ${price} and \\${x} #}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                        "{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                        encoding="utf-8")
    prefill_kit("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out"), "--template", str(template),
                "--prefix", r"<think>\n")
    config = verl_config(tmp_path / "out")
    written = (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8")
    assert written.startswith("{# costs ${price} and \\${x} #}")
    assert config.actor_rollout_ref.model.custom_chat_template == written


def naive_reward(config, model, item, response_text: str) -> dict:
    """verl's naive reward manager scoring one response, with the reward function verl loads from the config."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    manager = NaiveRewardManager(config, model.tokenizer, get_custom_reward_fn(config))
    tokenizer = model.tokenizer
    response = tokenizer.encode(response_text, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt = [tokenizer.pad_token_id or 0] * 4
    data = DataProto.from_dict(
        tensors={"prompts": torch.tensor([prompt]), "responses": torch.tensor([response]),
                 "attention_mask": torch.ones(1, len(prompt) + len(response), dtype=torch.long)},
        non_tensors={key: np.array([item[key]], dtype=object) for key in ("data_source", "reward_model", "extra_info")})
    return manager.loop.run_until_complete(manager.run_single(data))


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_verls_naive_reward_manager_scores_a_prefilled_think_completion(tmp_path, tmp_path_factory, tokenizer):
    if not callable(tokenizer) and not tokenizer.is_dir():
        pytest.skip(f"needs {tokenizer} (../shared/reference)")
    model_path = model_dir(tmp_path_factory, tokenizer)
    prefill_kit("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out"), "--tokenizer", model_path,
                "--prefix", r"<think>\n", "--rewards", "format,accuracy:2")
    config = verl_config(tmp_path / "out")
    _, model, items = verl_prompt_ids(config)
    item = items[0]  # "Tom has 12 apples and gives 5 to Sara", solution 7
    assert item["reward_model"]["ground_truth"] == "7" and item["extra_info"]["response_prefix"] == "<think>\n"

    # The model continues after the prefilled "<think>\n": its text alone holds no <think>.
    scored = naive_reward(config, model, item, "12 - 5 = 7.\n</think>\n<answer>7</answer>")
    assert scored["reward_score"] == 3.0
    assert scored["reward_extra_info"] == {"score": 3.0, "format": 1.0, "accuracy": 1.0}

    wrong = naive_reward(config, model, item, "12 + 5 = 17.\n</think>\n<answer>17</answer>")
    assert wrong["reward_extra_info"] == {"score": 1.0, "format": 1.0, "accuracy": 0.0}


@pytest.mark.skipif(not (GSM8K.is_file() and QWEN25.is_dir()), reason="needs GSM8K and Qwen2.5 in ../shared/reference")
def test_gsm8k_keeps_the_whole_reference_answer_and_scores_with_math_verify(tmp_path, tmp_path_factory):
    rows = [json.loads(line) for line in open(GSM8K, encoding="utf-8")][:16]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model_path = model_dir(tmp_path_factory, QWEN25)
    prefill_kit("export", "verl", str(data), "-o", str(tmp_path / "out"), "--tokenizer", model_path,
                "--prefix", r"<think>\n")
    config = verl_config(tmp_path / "out")
    _, model, items = verl_prompt_ids(config)
    assert [i["reward_model"]["ground_truth"] for i in items] == [r["answer"] for r in rows]
    assert items[0]["data_source"] == "gsm8k"
    final = rows[0]["answer"].rsplit("####", 1)[1].strip()  # 18
    # "\frac{36}{2}" is not a plain number: the verdict comes from math-verify under verl's antlr4 runtime.
    scored = naive_reward(config, model, items[0], f"...\n</think>\n<answer>$\\frac{{{2 * int(final)}}}{{2}}$</answer>")
    assert scored["reward_extra_info"] == {"score": 2.0, "format": 1.0, "accuracy": 1.0}


def verl_config_for_rollout(directory):
    """The exported config as the trainer sees it (its `rollout.name`, vLLM, names the GPU generation server,
    which is scripted here)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(directory), version_base=None):
        return compose(config_name="verl_overrides", overrides=["actor_rollout_ref.rollout.n=2"])


def test_verls_agent_loop_and_reward_loop_score_a_batch_as_the_trainer_builds_it(tmp_path, tmp_path_factory):
    import asyncio
    import uuid
    from types import SimpleNamespace

    import numpy as np
    from verl import DataProto
    from verl.experimental.agent_loop import single_turn_agent_loop  # noqa: F401  (registers the agent loop)
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import extract_reward
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.workers.rollout.replica import TokenOutput

    from prefill_kit.rewards import get_reward

    model_path = model_dir(tmp_path_factory, tiny)
    prefill_kit("render", str(EXAMPLE), "-o", str(tmp_path / "rendered.jsonl"), "--tokenizer", model_path,
                "--prefix", r"<think>\n")
    prefill_kit("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out"), "--tokenizer", model_path,
                "--prefix", r"<think>\n", "--rewards", "format,accuracy:2")
    rendered = [json.loads(line) for line in open(tmp_path / "rendered.jsonl", encoding="utf-8")][:4]
    config = verl_config_for_rollout(tmp_path / "out")
    model = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    tokenizer = model.tokenizer
    dataset = RLHFDataset(data_files=config.data.train_files, tokenizer=tokenizer, config=config.data,
                          processor=model.processor)

    # The trainer's step (RayPPOTrainer.fit): a collated batch, a uid per prompt, the generation keys, n rollouts.
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(len(rendered))]))
    batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
    gen_batch = batch.pop(batch_keys=[], non_tensor_batch_keys=[
        k for k in batch.non_tensor_batch if k not in {"data_source", "reward_model", "extra_info", "uid"}])
    gen_batch.non_tensor_batch.update(batch.non_tensor_batch)
    gen_batch = gen_batch.repeat(repeat_times=config.actor_rollout_ref.rollout.n, interleave=True)

    # The generation server, scripted: it knows each prompt only by prefill-kit's ids (an unknown prompt is a
    # KeyError) and continues after the prefilled "<think>\n", right on the first rollout and wrong on the second.
    solutions = {tuple(row["prompt_ids"]): row["solution"] for row in rendered}
    sampled: dict[tuple[int, ...], list[str]] = {}

    class ScriptedServer:
        async def generate(self, *, prompt_ids, **kwargs):
            solution = solutions[tuple(prompt_ids)]
            texts = sampled.setdefault(tuple(prompt_ids), [])
            answer = solution if not texts else solution + "1"
            texts.append(f"Let me count.\n</think>\n<answer>{answer}</answer>")
            return TokenOutput(token_ids=tokenizer.encode(texts[-1], add_special_tokens=False)
                               + [tokenizer.eos_token_id])

    async def rollout():
        rewards = RewardLoopWorker(config)  # a ray actor in the trainer, called in process here
        handle = SimpleNamespace(compute_score=SimpleNamespace(remote=rewards.compute_score))
        worker = AgentLoopWorker(config, llm_client=ScriptedServer(), reward_loop_worker_handles=[handle])
        return await worker.generate_sequences(gen_batch)

    output = asyncio.run(rollout())
    assert len(output) == 2 * len(rendered)
    reward_tensor, extra = extract_reward(output)  # what the trainer reads for the advantages
    prompt_length = output.batch["prompts"].shape[1]
    for i in range(len(output)):
        prompt = output.batch["prompts"][i][output.batch["attention_mask"][i][:prompt_length].bool()].tolist()
        row = rendered[i // 2]
        assert prompt == row["prompt_ids"]  # verl's left-padded prompt is exactly prefill-kit's
        # Which of the prompt's two samples this is, by its ids (the agent loop runs samples concurrently, so
        # the server's call order need not be the output order).
        response = output.batch["responses"][i][output.batch["attention_mask"][i][prompt_length:].bool()].tolist()
        by_ids = {tuple(tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]): t
                  for t in sampled[tuple(prompt)]}
        text = by_ids[tuple(response)]
        expected = {name: get_reward(name)([text], prefix=["<think>\n"], solution=[row["solution"]])[0]
                    for name in ("format", "accuracy")}
        assert expected == {"format": 1.0, "accuracy": 1.0 if text == sampled[tuple(prompt)][0] else 0.0}
        assert {name: float(extra[name][i]) for name in expected} == expected
        assert reward_tensor[i].sum().item() == expected["format"] + 2 * expected["accuracy"]
