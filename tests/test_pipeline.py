"""The Python API (`render_dataset`), exact piecewise tokenization, the token audit, and the CLI's pipeline flags."""

from __future__ import annotations

import json
import logging

import pytest

from prefill_kit.data.readers import Record
from prefill_kit.errors import ConfigError, DataError
from prefill_kit.prompts.batch import BatchRenderer
from prefill_kit.prompts.dataset import render_dataset, shard_bounds
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.render import render_prompt
from prefill_kit.prompts.tokens import PromptTokenizer
from prefill_kit.templates import ChatTemplate
from tests.conftest import REFERENCE_ABSENT, SHARED_REFERENCE

PREFIX = "<think>\n"
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} times {i}?"}], "solution": str(i * i), "id": i}
        for i in range(7)]
QWEN = SHARED_REFERENCE / "tokenizers" / "qwen2.5-instruct-DERIVED"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    if not QWEN.is_dir():
        pytest.skip(f"reference tokenizer not available: {QWEN} ({REFERENCE_ABSENT})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN))


def expected(chatml, row) -> str:
    return render_prompt(row["messages"], chatml, PREFIX).prompt


# --- render_dataset ---------------------------------------------------------------------------------------------

def test_dataset_in_dataset_out(chatml, tiny_tokenizer):
    import datasets

    out = render_dataset(datasets.Dataset.from_list(ROWS), tokenizer=tiny_tokenizer, prefix=PREFIX, batch_size=3)
    assert isinstance(out, datasets.Dataset)
    assert set(out.column_names) == {"prompt", "prefix", "solution", "id", "prompt_ids", "num_prompt_tokens"}
    rows = out.to_list()
    assert [r["prompt"] for r in rows] == [expected(chatml, r) for r in ROWS]
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS] and {r["prefix"] for r in rows} == {PREFIX}
    assert [r["prompt_ids"] for r in rows] == [tiny_tokenizer(r["prompt"], add_special_tokens=False).input_ids
                                               for r in rows]


def test_iterable_dataset_in_iterable_dataset_out(chatml):
    import datasets

    source = datasets.Dataset.from_list(ROWS).to_iterable_dataset()
    out = render_dataset(source, template="chatml", prefix=PREFIX)
    assert isinstance(out, datasets.IterableDataset)
    assert [r["prompt"] for r in out] == [expected(chatml, r) for r in ROWS]


def test_path_in(tmp_path, chatml):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    out = render_dataset(str(path), prefix=PREFIX)
    assert out["prompt"][:] == [expected(chatml, r) for r in ROWS]


def test_bad_dataset_row_raises_or_is_dropped_and_logged(chatml, caplog):
    import datasets

    rows = [*ROWS[:2], {"messages": [{"role": "nobody", "content": "x"}], "solution": "0", "id": 99}, *ROWS[2:]]
    data = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError, match=r"dataset row 3: field 'messages\[0\]\.role': unknown role"):
        render_dataset(data, prefix=PREFIX)
    with caplog.at_level(logging.WARNING, logger="prefill_kit.prompts.dataset"):
        out = render_dataset(data, prefix=PREFIX, on_error="skip")
    assert out["id"][:] == [r["id"] for r in ROWS]
    assert "skipped dataset row 3" in caplog.text and "unknown role" in caplog.text


def test_num_proc_renders_shards_in_processes_with_the_same_output_and_row_numbers(chatml, tiny_tokenizer):
    import datasets

    rows = [{**r, "id": 10 * k + r["id"]} for k in range(3) for r in ROWS]  # 21 rows: 3 shards of batch 7
    data = datasets.Dataset.from_list(rows)
    one = render_dataset(data, tokenizer=tiny_tokenizer, prefix=PREFIX, batch_size=7)
    three = render_dataset(data, tokenizer=tiny_tokenizer, prefix=PREFIX, batch_size=7, num_proc=3)
    assert three.to_list() == one.to_list() and three.features == one.features
    bad = datasets.Dataset.from_list([*rows[:16], {**rows[16], "messages": []}, *rows[17:]])
    with pytest.raises(DataError, match=r"dataset row 17: field 'messages': missing or empty") as caught:
        render_dataset(bad, prefix=PREFIX, batch_size=7, num_proc=3)
    assert caught.value.field == "messages" and caught.value.reason == "missing or empty conversation"
    kept = render_dataset(bad, prefix=PREFIX, batch_size=7, num_proc=3, on_error="skip")
    assert kept["id"][:] == [r["id"] for i, r in enumerate(rows) if i != 16]


@pytest.mark.parametrize(("rows", "num_proc", "batch_size", "shards"), [
    (21, 3, 7, [(0, 7), (7, 14), (14, 21)]),
    (10, 4, 7, [(0, 5), (5, 10)]),  # two batches of work: two processes, not four
    (5, 2, 1000, [(0, 5)]),  # less than a batch: one process
])
def test_shards_are_contiguous_cover_every_row_and_hold_about_a_batch(rows, num_proc, batch_size, shards):
    assert shard_bounds(rows, num_proc, batch_size) == shards


def test_rendered_dataset_is_used_by_trl_as_it_is(tiny_tokenizer):
    """TRL leaves a string prompt alone (no second chat template) and passes the other columns to rewards."""
    import datasets
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    out = render_dataset(datasets.Dataset.from_list(ROWS), tokenizer=tiny_tokenizer, prefix=PREFIX)
    row = out[0]
    assert not is_conversational(row)
    assert maybe_apply_chat_template(row, tiny_tokenizer)["prompt"] == row["prompt"]


def test_options_that_count_tokens_need_a_tokenizer(chatml):
    with pytest.raises(ConfigError, match="need a tokenizer"):
        RenderOptions(chatml, max_prompt_tokens=10)
    with pytest.raises(ConfigError, match="on_error"):
        RenderOptions(chatml, on_error="ignore")


# --- piecewise tokenization (every family: tests/test_prompt_tokens.py) -----------------------------------------

TEXTS = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n",
         "<|im_start|><|im_end|>", "", "no specials at all", "  leading spaces<|im_end|>  trailing  ",
         "unicode: caf\u00e9 \u4f60\u597d \U0001f600<|im_start|>\n\n\n<|endoftext|>x",
         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"] * 3


def test_piecewise_ids_equal_whole_text_ids(tiny_tokenizer):
    encoder = PromptTokenizer(tiny_tokenizer)
    assert encoder.blocker is None  # the piecewise path is the one under test
    assert encoder.encode(TEXTS) == tiny_tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert encoder._memo  # the repeated template pieces were memoised
    assert encoder.encode(TEXTS[::-1]) == tiny_tokenizer(TEXTS[::-1], add_special_tokens=False)["input_ids"]


def test_tokens_that_strip_whitespace_are_encoded_whole(chatml):
    from tokenizers import AddedToken

    from prefill_kit.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(chat_template=chatml.source)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<mask>", lstrip=True)]})
    encoder = PromptTokenizer(tokenizer)
    texts = ["a <mask> b", "x<|im_start|> <mask>"]
    assert encoder.blocker is not None
    assert encoder.encode(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


# --- token audit ------------------------------------------------------------------------------------------------

def _audit(template, tokenizer, prefixes):
    options = RenderOptions(template, tokenizer=tokenizer, check_tokens=True)
    records = [Record("in.jsonl", "line", i + 1, {"messages": [{"role": "user", "content": "hi"}], "prefix": p})
               for i, p in enumerate(prefixes)]
    return BatchRenderer(options, "messages")(records)


def test_check_tokens_counts_rows_whose_prefix_merges_with_the_prompt(tiny_tokenizer):
    # A generation prompt ending mid-word: a prefix continuing that word joins one pre-token with it.
    template = ChatTemplate("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nans{% endif %}")
    prefixes = ["wer", "\n", "wer", " 12"]
    result = _audit(template, tiny_tokenizer, prefixes)

    def merges(row) -> bool:
        head = row["prompt"][: -len(row["prefix"])]
        split = tiny_tokenizer(head, add_special_tokens=False).input_ids + \
            tiny_tokenizer(row["prefix"], add_special_tokens=False).input_ids
        return split != tiny_tokenizer(row["prompt"], add_special_tokens=False).input_ids

    expected_lines = [i + 1 for i, row in enumerate(result.rows) if merges(row)]
    assert result.merges == len(expected_lines) >= 1
    assert result.merge_example.where == f"in.jsonl:{expected_lines[0]}"
    assert result.merge_example.whole != result.merge_example.split


def test_check_tokens_on_qwen_newline_prefix_merges_think_prefix_does_not(qwen_tokenizer, chatml):
    # Qwen2.5 has one token for "\n\n": a "\n" prefix after the header's "\n" is not token-stable;
    # "<think>\n" starts with "<", which no pre-token joins to a preceding newline.
    assert _audit(chatml, qwen_tokenizer, ["\n", "\n"]).merges == 2
    assert _audit(chatml, qwen_tokenizer, [PREFIX, PREFIX]).merges == 0


# --- the CLI's pipeline flags -----------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    from prefill_kit.cli import main

    code = main(["render", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_skip_prints_counts_and_rejects_path(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"q": "1+1?", "gold": "2"}\n{"q": ""}\nnot json\n{"q": "2+2?", "gold": "4"}\n')
    code, _, err = run_cli(capsys, str(source), "--columns", '{"q": "question", "gold": "answer"}',
                           "--on-error", "skip", "--quiet")
    assert code == 0
    assert "rows in: 4  out: 2  rejected: 2  format: problem" in err
    assert str(tmp_path / "in.prefilled.rejects.jsonl") in err
    rows = [json.loads(line) for line in (tmp_path / "in.prefilled.jsonl").read_text().splitlines()]
    assert [r["solution"] for r in rows] == ["2", "4"] and [r["answer"] for r in rows] == ["2", "4"]


def test_cli_output_format_and_stdout(tmp_path, capsys):
    import pyarrow.parquet as pq

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    code, _, _ = run_cli(capsys, str(source), "--output-format", "parquet")
    assert code == 0 and pq.read_table(tmp_path / "in.prefilled.parquet").num_rows == len(ROWS)
    code, out, _ = run_cli(capsys, str(source), "-o", "-", "--format", "messages")
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == [r["id"] for r in ROWS]


def test_cli_token_flags_need_a_tokenizer(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    code, _, err = run_cli(capsys, str(source), "--max-prompt-tokens", "5")
    assert code == 2 and "need --tokenizer" in err
    assert not (tmp_path / "in.prefilled.jsonl").exists()


def test_cli_check_tokens_prints_count(tmp_path, capsys, tiny_model_dir):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    code, _, err = run_cli(capsys, str(source), "--tokenizer", str(tiny_model_dir), "--prefix", r"<think>\n",
                           "--check-tokens", "--quiet")
    assert code == 0 and f"token audit: 0 of {len(ROWS)} rows have a boundary merge" in err
