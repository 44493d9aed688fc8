"""Trackers and evaluation during training, in both backends: same names and steps as metrics.jsonl, eval rows
scored over the whole eval set and never trained on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefill_kit.backends import builtin, trl
from prefill_kit.backends.trl import one_record_set
from prefill_kit.config import DataSection, config_from_dict
from prefill_kit.errors import ConfigError, PrefillKitError
from prefill_kit.prompts.training_data import load_eval_data
from prefill_kit.rewards import format_reward
from prefill_kit.runs.completion_log import eval_metrics
from prefill_kit.runs.trl_config import grpo_config_kwargs
from tests import recording_reward
from tests.conftest import REPO

BACKENDS = {"builtin": builtin.train, "trl": trl.train}
PREFIX = "<think>\n"
HELDOUT = "HELDOUT"
NUM_EVAL, EVAL_G = 5, 2  # 5 prompts in batches of 2: the last batch is smaller, so per-batch means would differ

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def raw_config(model_dir, out_dir, **sections) -> dict:
    raw = {"model": {"path": str(model_dir)},
           "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX},
           "rewards": [{"name": "format", "weight": 1.0}, {"name": "tests.recording_reward:record", "weight": 0.5}],
           "grpo": {"num_generations": 2, "max_completion_length": 8},
           "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 3, "seed": 0},
           "output": {"dir": str(out_dir), "save_steps": 0}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key != "trl" else value
    return raw


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    rows = [{"question": f"{HELDOUT} {k}: what is {k} + {k}?", "answer": str(2 * k)} for k in range(NUM_EVAL)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def eval_sections(eval_file) -> dict:
    return {"data": {"eval_path": str(eval_file)}, "train": {"eval_steps": 2},
            "grpo": {"eval_num_generations": EVAL_G, "eval_temperature": 0.7}}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, eval_file, tmp_path_factory):
    """Each backend trains 3 steps once, evaluating at steps 2 and 3, with TensorBoard and offline wandb.

    Records every reward call, the prompts of every forward pass that computes gradients, and the sampling
    temperature of every `generate` call with whether its prompts were held out.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {}
    for backend, train in BACKENDS.items():
        grad_prompts: list[str] = []
        temperatures: list[tuple[bool, float]] = []  # (held-out prompts?, temperature) per generate call

        def hook(module, args, kwargs, _seen=grad_prompts):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and torch.is_grad_enabled():
                _seen.extend(tokenizer.batch_decode(ids))

        original = AutoModelForCausalLM.from_pretrained

        def loading(*args, _original=original, _temps=temperatures, **kwargs):
            model = _original(*args, **kwargs)
            model.register_forward_pre_hook(hook, with_kwargs=True)
            plain_generate = model.generate

            def generate(*a, **kw):
                heldout = [HELDOUT in p for p in tokenizer.batch_decode(kw["input_ids"])]
                assert len(set(heldout)) == 1, "a generate call mixes eval and training prompts"
                _temps.append((heldout[0], kw["generation_config"].temperature))
                return plain_generate(*a, **kw)

            model.generate = generate
            return model

        run_dir = tmp_path_factory.mktemp(backend) / "run"
        raw = raw_config(tiny_model_dir, run_dir, backend=backend, **eval_sections(eval_file))
        raw["output"].update(report_to=["tensorboard", "wandb"], run_name=f"test-{backend}")
        recording_reward.CALLS.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(AutoModelForCausalLM, "from_pretrained", loading)
            mp.setenv("WANDB_MODE", "offline")
            mp.setenv("WANDB_SILENT", "true")
            mp.setenv("WANDB_CONFIG_DIR", str(run_dir.parent / "wandb-config"))
            mp.setenv("WANDB_CACHE_DIR", str(run_dir.parent / "wandb-cache"))
            result = train(config_from_dict(raw))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[backend] = {"dir": run_dir, "rows": rows, "calls": list(recording_reward.CALLS),
                        "grad_prompts": grad_prompts, "temperatures": temperatures, "result": result}
    return out


# --------------------------------------------------------------------------------------------------- config


def test_report_to_takes_only_known_trackers(tmp_path):
    with pytest.raises(ConfigError, match=r"output.report_to\[1\]: unknown tracker 'tensorbord'; known: tensorboard"):
        config_from_dict(raw_config("m", tmp_path, output={"report_to": ["wandb", "tensorbord"]}))
    with pytest.raises(ConfigError, match="listed twice"):
        config_from_dict(raw_config("m", tmp_path, output={"report_to": ["wandb", "wandb"]}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_tracker_package_fails_before_loading_naming_it(backend, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    config = config_from_dict(raw_config(tmp_path / "no-model", tmp_path / "run", backend=backend,
                                         output={"report_to": ["mlflow"]}))
    with pytest.raises(ConfigError, match=r"output.report_to: mlflow needs the `mlflow` package"):
        BACKENDS[backend](config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_preflight_names_a_missing_tracker_package(backend, tmp_path, monkeypatch):
    from prefill_kit.runs.preflight import check_backend_options

    monkeypatch.setitem(sys.modules, "trackio", None)
    config = config_from_dict(raw_config("m", tmp_path, output={"report_to": ["trackio"]}))
    with pytest.raises(ConfigError, match=r"trackio needs the `trackio` package"):
        check_backend_options(config, backend)


def test_eval_needs_both_its_data_and_its_schedule(tmp_path, eval_file):
    with pytest.raises(ConfigError, match="train.eval_steps: data.eval_path is set"):
        config_from_dict(raw_config("m", tmp_path, data={"eval_path": str(eval_file)}))
    with pytest.raises(ConfigError, match="data.eval_path: train.eval_steps is 5 but there is no eval data"):
        config_from_dict(raw_config("m", tmp_path, train={"eval_steps": 5}))
    with pytest.raises(ConfigError, match="grpo.eval_num_generations: expected a positive integer"):
        config_from_dict(raw_config("m", tmp_path, grpo={"eval_num_generations": 0}))


def test_the_training_file_is_refused_as_eval_data(tiny_tokenizer, eval_file):
    section = DataSection(path=str(eval_file), eval_path=str(eval_file.parent / ".." / eval_file.parent.name /
                                                               eval_file.name))
    with pytest.raises(ConfigError, match="is the training data; eval rows must be held out"):
        load_eval_data(section, tiny_tokenizer)


def test_trl_section_cannot_set_what_output_and_eval_options_set(tmp_path):
    config = config_from_dict(raw_config(tmp_path / "no-model", tmp_path, backend="trl",
                                         trl={"report_to": ["wandb"]}))
    with pytest.raises(ConfigError, match=r"trl.report_to: .*set output.report_to instead"):
        trl.train(config)


def test_trl_refuses_an_eval_temperature_vllm_would_not_use(eval_file, tmp_path):
    from prefill_kit.runs.trl_config import trl_extra_kwargs

    sections = eval_sections(eval_file)
    with pytest.raises(ConfigError, match="grpo.eval_temperature: with trl.use_vllm"):
        trl_extra_kwargs(config_from_dict(raw_config("m", tmp_path, trl={"use_vllm": True}, **sections)))
    sections["grpo"]["eval_temperature"] = 1.0  # the training temperature: nothing to switch
    assert trl_extra_kwargs(config_from_dict(raw_config("m", tmp_path, trl={"use_vllm": True}, **sections)))


def test_trl_config_maps_eval_options(eval_file, tmp_path):
    kwargs = grpo_config_kwargs(config_from_dict(raw_config("m", tmp_path, **eval_sections(eval_file))))
    assert kwargs["eval_strategy"] == "steps" and kwargs["eval_steps"] == 2
    assert kwargs["num_generations_eval"] == EVAL_G and kwargs["per_device_eval_batch_size"] == 4
    assert kwargs["report_to"] == "none"  # prefill-kit's trackers log, under metrics.jsonl's names
    assert grpo_config_kwargs(config_from_dict(raw_config("m", tmp_path)))["eval_strategy"] == "no"


def test_the_run_summary_reads_the_last_training_row_and_the_last_eval(tmp_path):
    from prefill_kit.cli.train import run_summary

    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 3, "loss": 0.25, "reward": 0.5, "completion_length": 7.0}) + "\n"
        + json.dumps({"step": 3, "eval/reward": 0.75, "eval/rewards/format": 0.75}) + "\n", encoding="utf-8")
    summary = run_summary(config_from_dict(raw_config("m", tmp_path)))
    assert summary.startswith("builtin backend: 3 steps; reward 0.5; loss 0.25; completion_length 7; eval/reward 0.75")


# ------------------------------------------------------------------------------------------ pure functions


def test_eval_metrics_are_none_aware_means_over_every_completion():
    scores = [[1.0, 0.0], [None, 2.0], [0.0, None], [None, None]]  # rewards a (weight 1) and b (weight 0.5)
    metrics = eval_metrics(scores, ["a", "b"], [1.0, 0.5])
    assert metrics["eval/rewards/a"] == pytest.approx(0.5)  # (1 + 0) / 2: None skipped
    assert metrics["eval/rewards/b"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert metrics["eval/reward"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)  # the unscorable row is left out
    assert eval_metrics([[None]], ["a"], [1.0]) == {"eval/reward": None, "eval/rewards/a": None}


def test_one_record_set_drops_padding_repeats_and_refuses_missing_completions():
    # 3 prompts x 2 completions over 2 processes; accelerate padded the last batch with prompt 0 again
    records = [(0, [1.0]), (0, [1.0]), (2, [0.0]), (2, [0.0]), (1, [0.5]), (1, [0.5]), (0, [9.0]), (0, [9.0])]
    assert one_record_set(records, num_prompts=3, num_generations=2) == [[1.0], [1.0], [0.0], [0.0], [0.5], [0.5]]
    with pytest.raises(PrefillKitError, match="eval row 1 got 1 completions, not 2"):
        one_record_set([(0, [1.0]), (0, [1.0]), (1, [0.0])], num_prompts=2, num_generations=2)


def test_process_shards_cover_every_eval_row_exactly_once():
    from prefill_kit.backends.builtin.evaluation import process_shard

    for num_rows in range(12):
        for world in range(1, 5):
            rows = [i for rank in range(world) for i in process_shard(num_rows, rank, world)]
            assert rows == list(range(num_rows)), (num_rows, world)


# ---------------------------------------------------------------------------------------------- end to end


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def metrics_as_scalars(rows: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value is not None:
                out.setdefault(key, {})[row["step"]] = value
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensorboard_holds_the_metrics_rows_under_their_names_and_steps(runs, backend):
    run = runs[backend]
    logged = tensorboard_scalars(run["dir"] / "tensorboard")
    expected = metrics_as_scalars(run["rows"])
    assert set(logged) == set(expected)
    for tag, points in expected.items():
        assert logged[tag] == pytest.approx(points, rel=1e-6), tag  # TensorBoard stores float32
    assert {"reward", "loss", "rewards/format", "eval/reward", "eval/rewards/format"} <= set(logged)


def test_both_backends_log_the_same_names(runs):
    names = {backend: set(tensorboard_scalars(run["dir"] / "tensorboard")) for backend, run in runs.items()}
    assert names["builtin"] == names["trl"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_wandb_offline_run_leaves_its_files(runs, backend):
    run_dirs = list((runs[backend]["dir"] / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    assert [p.stat().st_size > 0 for p in run_dirs[0].glob("run-*.wandb")] == [True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_rows_come_every_eval_steps_and_after_the_last_step(runs, backend):
    eval_rows = [r for r in runs[backend]["rows"] if "eval/reward" in r]
    assert [r["step"] for r in eval_rows] == [2, 3]
    assert set(eval_rows[0]) == {"step", "eval/reward", "eval/rewards/format",
                                 "eval/rewards/tests.recording_reward:record"}
    train_rows = [r for r in runs[backend]["rows"] if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3] and not any("eval/reward" in r for r in train_rows)


def eval_rounds(calls: list[dict]) -> list[list[dict]]:
    """The reward calls of each evaluation: consecutive calls on held-out prompts."""
    rounds, current = [], []
    for call in calls:
        if all(HELDOUT in p for p in call["prompts"]):
            current.append(call)
        else:
            assert not any(HELDOUT in p for p in call["prompts"]), "a training batch holds an eval prompt"
            if current:
                rounds.append(current)
            current = []
    return rounds + ([current] if current else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_means_cover_every_eval_prompt_equally(runs, backend):
    run = runs[backend]
    rounds = eval_rounds(run["calls"])
    eval_rows = [r for r in run["rows"] if "eval/reward" in r]
    assert len(rounds) == len(eval_rows) == 2
    for calls, row in zip(rounds, eval_rows, strict=True):
        prompts = [p for c in calls for p in c["prompts"]]
        counts = {k: sum(f"{HELDOUT} {k}:" in p for p in prompts) for k in range(NUM_EVAL)}
        assert counts == dict.fromkeys(range(NUM_EVAL), EVAL_G)  # every eval prompt, EVAL_G times, nothing else
        completions = [c for call in calls for c in call["completions"]]
        fmt = format_reward(completions, prefix=[PREFIX] * len(completions))
        record = [float(len(c) % 3) for c in completions]  # what tests.recording_reward returns
        assert row["eval/rewards/format"] == pytest.approx(sum(fmt) / len(fmt))
        assert row["eval/rewards/tests.recording_reward:record"] == pytest.approx(sum(record) / len(record))
        totals = [f + 0.5 * r for f, r in zip(fmt, record, strict=True)]
        assert row["eval/reward"] == pytest.approx(sum(totals) / len(totals))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eval_row_is_never_trained_on(runs, backend):
    grad_prompts = runs[backend]["grad_prompts"]
    assert grad_prompts, "no forward pass with gradients was seen"
    assert not [p for p in grad_prompts if HELDOUT in p]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_samples_at_eval_temperature_and_training_at_temperature(runs, backend):
    temperatures = runs[backend]["temperatures"]
    assert {t for heldout, t in temperatures if heldout} == {0.7}
    assert {t for heldout, t in temperatures if not heldout} == {1.0}


def test_builtin_evaluation_leaves_training_exactly_as_without_it(runs, tiny_model_dir, tmp_path):
    """Eval sampling runs under its own RNG: the training stream is the same with or without evaluation."""
    plain = builtin.train(config_from_dict(raw_config(tiny_model_dir, tmp_path / "plain")), progress=False)
    with_eval = runs["builtin"]["result"]
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in with_eval.history]
    assert [r["reward"] for r in plain.history] == [r["reward"] for r in with_eval.history]
    assert [r["step"] for r in with_eval.eval_history] == [2, 3]


def test_builtin_resume_with_eval_and_tensorboard_stays_exact(tiny_model_dir, eval_file, tmp_path):
    """A resumed run rewrites the same rows, eval included, and TensorBoard shows each step once."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def config(run: str, **output):
        raw = raw_config(tiny_model_dir, tmp_path / run, **eval_sections(eval_file))
        raw["output"].update(save_steps=2, report_to=["tensorboard"], **output)
        return config_from_dict(raw)

    builtin.train(config("full"), progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    builtin.train(config("resumed", resume_from=str(tmp_path / "resumed" / "checkpoint-2")), progress=False)

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in lines]

    assert rows("resumed") == rows("full")
    assert [r["step"] for r in rows("full") if "eval/reward" in r] == [2, 3]
    events = EventAccumulator(str(tmp_path / "resumed" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]  # the stopped run's step 3 is purged
    assert [e.step for e in events.Scalars("eval/reward")] == [2, 3]
    assert tensorboard_scalars(tmp_path / "resumed" / "tensorboard")["eval/reward"] == pytest.approx(
        {r["step"]: r["eval/reward"] for r in rows("full") if "eval/reward" in r}, rel=1e-6)
