"""`prefill-kit export verl`: the dataset, the chat template and the overrides, checked with transformers' own
`apply_chat_template` (what verl calls). verl's own data code is checked in CI's verl venv
(tests/integrations/test_verl_real.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from prefill_kit.errors import ConfigError, DataError
from prefill_kit.integrations.verl_export import _omegaconf_literal, export_verl, template_with_suffix
from prefill_kit.prompts.dataset import render_dataset
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.templates import ChatTemplate, load_template
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "math_tiny.jsonl"
USER = [{"role": "user", "content": "hi"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(directory):
    return pq.read_table(directory / "train.parquet").to_pylist()


# --- the template -----------------------------------------------------------------------------------------

SUFFIXES = ["<think>\n", '}}{% raw %}\\"\u2028\r\n\t€😀{# x #}${a}']


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_template_with_suffix_appends_to_the_generation_prompt_only(suffix, tiny_tokenizer):
    # The source ends with text and a newline, which Jinja drops: it must not land before the suffix.
    source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{{ '<A>' if add_generation_prompt }}\n"
    written = template_with_suffix(source, suffix)
    for render in (lambda t, gen: ChatTemplate(t).render(USER, add_generation_prompt=gen),
                   lambda t, gen: tiny_tokenizer.apply_chat_template(USER, chat_template=t, tokenize=False,
                                                                     add_generation_prompt=gen)):
        assert render(written, True) == "<user>hi\n<A>" + suffix
        assert render(written, False) == render(source, False) == "<user>hi\n"


def test_an_empty_suffix_leaves_the_template_unchanged():
    source = load_template("qwen2.5").source
    assert template_with_suffix(source, "") == source


# --- the export -------------------------------------------------------------------------------------------

@pytest.fixture
def tok_dir(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_export_rows_render_to_prefill_kits_prompt_ids_with_the_written_template(tmp_path, tok_dir, tiny_tokenizer):
    options = RenderOptions(load_template("qwen2.5"), "<think>\n", tokenizer=tiny_tokenizer)
    summary = export_verl(EXAMPLE, tmp_path / "out", options, rewards="format,accuracy:2")
    assert summary.rows == 32 and summary.generation_suffix == "<think>\n" and summary.response_prefix == "<think>\n"
    rows = read_rows(tmp_path / "out")
    template = (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8")
    source = [json.loads(line) for line in open(EXAMPLE, encoding="utf-8")]
    expected = render_dataset(str(EXAMPLE), "qwen2.5", tiny_tokenizer, "<think>\n")
    for i, (row, src, want) in enumerate(zip(rows, source, expected, strict=True)):
        assert row["data_source"] == "math_tiny" and row["ability"] == "math"
        assert row["prompt"] == src["messages"]
        assert row["reward_model"] == {"style": "rule", "ground_truth": src["solution"]}
        assert row["extra_info"] == {"index": i, "response_prefix": "<think>\n", "id": src["id"]}
        # What verl does: the tokenizer's apply_chat_template with the custom template, tokenize=True.
        ids = tiny_tokenizer.apply_chat_template(row["prompt"], chat_template=template, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        assert list(ids) == want["prompt_ids"]
        text = tiny_tokenizer.apply_chat_template(row["prompt"], chat_template=template, add_generation_prompt=True,
                                                  tokenize=False)
        assert text == want["prompt"] and text.endswith("<|im_start|>assistant\n<think>\n")
    assert summary.max_prompt_tokens == max(len(r["prompt_ids"]) for r in expected)


def test_overrides_point_verl_at_the_data_template_and_reward(tmp_path, tiny_tokenizer, tok_dir):
    options = RenderOptions(load_template("qwen2.5"), "<think>\n", template_kwargs={"enable_thinking": True},
                            tokenizer=tiny_tokenizer)
    summary = export_verl(EXAMPLE, tmp_path / "out", options, rewards="format,accuracy:2", model_path=str(tok_dir))
    out = (tmp_path / "out").resolve()
    config = yaml.safe_load((out / "verl_overrides.yaml").read_text(encoding="utf-8"))
    assert config["defaults"] == ["ppo_trainer", "_self_"]
    assert config["hydra"] == {"searchpath": ["pkg://verl.trainer.config"]}
    assert config["data"] == {"train_files": str(out / "train.parquet"), "val_files": str(out / "train.parquet"),
                              "prompt_key": "prompt", "apply_chat_template_kwargs": {"enable_thinking": True},
                              "max_prompt_length": summary.max_prompt_tokens}
    assert config["actor_rollout_ref"]["model"] == {
        "custom_chat_template": (out / "chat_template.jinja").read_text(encoding="utf-8"), "path": str(tok_dir)}
    assert config["reward"]["custom_reward_function"] == {
        "path": "pkg://prefill_kit.integrations.verl", "name": "compute_score",
        "reward_kwargs": {"rewards": "format,accuracy:2"}}


def test_omegaconf_interpolation_marks_are_escaped():
    assert _omegaconf_literal("a ${b} c") == "a \\${b} c"
    assert _omegaconf_literal("\\${b}") == "\\\\\\${b}"
    assert _omegaconf_literal("{{ '$' }}{ x }") == "{{ '$' }}{ x }"


def test_a_template_that_writes_the_prefix_is_exported_unchanged(tmp_path):
    options = RenderOptions(load_template("deepseek-r1"), "<think>\n")
    summary = export_verl(EXAMPLE, tmp_path / "out", options)
    assert summary.generation_suffix == ""
    assert (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8") == load_template("deepseek-r1").source
    assert {r["extra_info"]["response_prefix"] for r in read_rows(tmp_path / "out")} == {"<think>\n"}


def test_rows_with_different_prefixes_are_an_error_naming_the_row(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2"},
                                              {"problem": "2+2?", "answer": "4", "prefix": "<think>\nLet"}])
    with pytest.raises(DataError) as info:
        export_verl(data, tmp_path / "out", RenderOptions(load_template("chatml"), "<think>\n"))
    assert info.value.field == "prefix" and info.value.source == f"{data}:2"
    assert "one chat template" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_skipped_rows_go_to_rejects_and_the_kept_rows_stay_aligned(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2", "id": "a"},
                                              {"problem": "", "answer": "0", "id": "bad"},
                                              {"problem": "2+2?", "answer": "4", "id": "c"}])
    summary = export_verl(data, tmp_path / "out", RenderOptions(load_template("chatml"), "<think>\n",
                                                                on_error="skip"))
    assert (summary.rows, summary.rejected) == (2, 1)
    rows = read_rows(tmp_path / "out")
    assert [(r["extra_info"]["id"], r["prompt"][-1]["content"], r["reward_model"]["ground_truth"]) for r in rows] == [
        ("a", "1+1?", "2"), ("c", "2+2?", "4")]
    (reject,) = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert reject["line"] == 2 and reject["field"] == "problem"


def test_rows_over_max_prompt_tokens_are_rejected_and_the_kept_rows_stay_aligned(tmp_path, tiny_tokenizer):
    long = "many words " * 40
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2", "id": "a"},
                                              {"problem": long, "answer": "0", "id": "long"},
                                              {"problem": "2+2?", "answer": "4", "id": "c"}])
    options = RenderOptions(load_template("chatml"), "<think>\n", tokenizer=tiny_tokenizer, on_error="skip",
                            max_prompt_tokens=40)
    summary = export_verl(data, tmp_path / "out", options)
    assert (summary.rows, summary.rejected) == (2, 1)
    assert [(r["extra_info"]["id"], r["prompt"][-1]["content"]) for r in read_rows(tmp_path / "out")] == [
        ("a", "1+1?"), ("c", "2+2?")]
    (reject,) = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert reject["line"] == 2 and "prompt too long" in reject["reason"]


def test_a_column_named_like_an_extra_info_key_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2", "index": 7}])
    with pytest.raises(DataError, match="extra_info's own 'index'"):
        export_verl(data, tmp_path / "out", RenderOptions(load_template("chatml")))


def test_continue_final_and_a_foreign_output_directory_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="continue"):
        export_verl(EXAMPLE, tmp_path / "out", RenderOptions(load_template("chatml"), continue_final=True))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds other files"):
        export_verl(EXAMPLE, tmp_path / "mine", RenderOptions(load_template("chatml")))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefill_kit", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_prints_the_launch_line_and_a_bad_row_in_one_line(tmp_path):
    result = run_cli("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out"), "--prefix", r"<think>\n",
                     "--template", "qwen2.5", "--data-source", "gsm8k", "--rewards", "format,accuracy:2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"python -m verl.trainer.main_ppo --config-path {(tmp_path / 'out').resolve()} "
                                    "--config-name verl_overrides ")
    assert "exported 32 rows" in result.stderr and "'<think>\\n'" in result.stderr
    assert {r["data_source"] for r in read_rows(tmp_path / "out")} == {"gsm8k"}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?"}, {"problem": 3}])
    result = run_cli("export", "verl", str(bad), "-o", str(tmp_path / "out2"))
    assert result.returncode == 2
    assert result.stderr == (f"prefill-kit export: error: {bad}:2: field 'problem': malformed content: "
                             "expected a string, got int\n")
    result = run_cli("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out3"), "--rewards", "nope")
    assert result.returncode == 2 and "unknown reward 'nope'" in result.stderr and result.stderr.count("\n") == 1


def test_cli_writes_the_model_path_absolute_for_verl(tmp_path, tok_dir):
    result = run_cli("export", "verl", str(EXAMPLE), "-o", "out", "--tokenizer", "tok", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "out" / "verl_overrides.yaml").read_text(encoding="utf-8"))
    assert config["actor_rollout_ref"]["model"]["path"] == str(tok_dir.resolve())
    assert "actor_rollout_ref.model.path" not in result.stdout  # the launch line needs no MODEL placeholder


# --- few-shot and rendered prompts (issue 18, item 3) --------------------------------------------------------

FEW_SHOT = REPO / "examples" / "math_few_shot.jsonl"


def _verl_text(tokenizer, directory, row) -> str:
    template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return tokenizer.apply_chat_template(row["prompt"], chat_template=template, add_generation_prompt=True,
                                        tokenize=False)


@pytest.mark.parametrize("mode", ["turns", "system"])
def test_cli_exports_few_shot_rows_as_verl_renders_them(tmp_path, tiny_tokenizer, mode):
    """`export verl --few-shot` (once "unrecognized arguments"): verl's rendering of each exported row, through
    transformers' apply_chat_template, is `render --few-shot`'s prompt, text for text."""
    common = ["--prefix", r"<think>\n", "--template", "qwen2.5", "--few-shot", str(FEW_SHOT), "--shots", "2",
              "--few-shot-mode", mode]
    result = run_cli("export", "verl", str(EXAMPLE), "-o", str(tmp_path / "out"), *common)
    assert result.returncode == 0, result.stderr
    rendered = run_cli("render", str(EXAMPLE), "-o", str(tmp_path / "r.jsonl"), *common)
    assert rendered.returncode == 0, rendered.stderr
    want = [json.loads(line) for line in open(tmp_path / "r.jsonl", encoding="utf-8")]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == len(want) == 32
    for row, expected in zip(rows, want, strict=True):
        assert _verl_text(tiny_tokenizer, tmp_path / "out", row) == expected["prompt"]
        assert row["extra_info"]["few_shot_indices"] == expected["few_shot_indices"]
        assert len(expected["few_shot_indices"]) == 2 and "Question:" * (mode == "system") in expected["prompt"]


def test_cli_exports_already_rendered_rows_with_pass_rendered(tmp_path, tiny_tokenizer):
    """`render --few-shot`'s output, exported with --pass-rendered: verl's prompt is that text, verbatim."""
    rendered = run_cli("render", str(EXAMPLE), "-o", str(tmp_path / "r.jsonl"), "--prefix", r"<think>\n",
                       "--template", "qwen2.5", "--few-shot", str(FEW_SHOT), "--shots", "2")
    assert rendered.returncode == 0, rendered.stderr
    refused = run_cli("export", "verl", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "no"), "--template", "qwen2.5")
    assert refused.returncode == 2 and "--pass-rendered" in refused.stderr
    result = run_cli("export", "verl", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "out"), "--template", "qwen2.5",
                     "--pass-rendered")
    assert result.returncode == 0, result.stderr
    want = [json.loads(line) for line in open(tmp_path / "r.jsonl", encoding="utf-8")]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == len(want) == 32
    for row, expected in zip(rows, want, strict=True):
        assert _verl_text(tiny_tokenizer, tmp_path / "out", row) == expected["prompt"]
        assert row["extra_info"]["response_prefix"] == "<think>\n"
        assert row["reward_model"]["ground_truth"] == expected["solution"]
