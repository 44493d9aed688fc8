"""Few-shot prompts: loading and checking the examples, the per-row choice, both modes, the history-rewrite
check, the token budget, and the CLI and training-config paths."""

from __future__ import annotations

import copy
import json

import pytest

from prefill_kit.errors import ConfigError, DataError
from prefill_kit.prompts.few_shot import (
    Example,
    FewShot,
    answer_format_problem,
    choose_examples,
    load_few_shot,
    opened_block,
    with_examples,
)
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.render_file import render_file
from prefill_kit.templates import ChatTemplate, load_template
from tests.conftest import REFERENCE_ABSENT, REPO, SHARED_REFERENCE
from tests.test_cli_render import read_jsonl, run_cli

PREFIX = "<think>\n"
SHIPPED_EXAMPLES = REPO / "examples" / "math_few_shot.jsonl"
QWEN3_REFERENCE = SHARED_REFERENCE / "templates" / "qwen3.jinja"


def answer(i: int) -> str:
    return f"<think>\nstep {i}\n</think>\n<answer>{i}</answer>"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def shots_file(tmp_path):
    return write_jsonl(tmp_path / "shots.jsonl", [{"question": f"Q{i}?", "answer": answer(i)} for i in range(6)])


@pytest.fixture
def data_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Row {i}?"}], "solution": str(i), "id": i} for i in range(10)]
    return write_jsonl(tmp_path / "data.jsonl", rows)


@pytest.fixture(scope="module")
def qwen3_reference():
    if not QWEN3_REFERENCE.is_file():
        pytest.skip(f"reference template not available: {QWEN3_REFERENCE} ({REFERENCE_ABSENT})")
    return ChatTemplate(QWEN3_REFERENCE.read_text(encoding="utf-8"), "qwen3 (reference)")


def render(tmp_path, data, options, **kwargs):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.jsonl"
    summary = render_file(data, str(out), options, **kwargs)
    return summary, read_jsonl(out)


# --- the examples ----------------------------------------------------------------------------------------------

def test_examples_load_from_any_format(tmp_path):
    messages = [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": answer(1)}]}]
    problem = [{"problem": "Q?", "solution": answer(1)}]
    alpaca = [{"instruction": "Q?", "output": answer(1)}]
    for name, rows in (("m", messages), ("p", problem), ("a", alpaca)):
        few = load_few_shot(write_jsonl(tmp_path / f"{name}.jsonl", rows), shots=1, prefix=PREFIX)
        assert [(e.question, e.answer) for e in few.examples] == [("Q?", answer(1))]


def test_the_block_the_prefix_opens():
    assert opened_block("<think>\n") == "think"
    assert opened_block("<reasoning>Let me see.") == "reasoning"
    assert opened_block("<think>\n</think>\n") is None and opened_block("Answer:") is None
    assert answer_format_problem(answer(1), PREFIX) is None
    assert answer_format_problem("no block, just 7", "") is None  # a prefix that opens no block asks nothing
    for bad in ("<think>\nnever closed", "<think>x</think>", "7 <think>x</think> 7",
                "<think>a</think><think>b</think> 7"):
        assert "opens <think>" in answer_format_problem(bad, PREFIX), bad


def test_an_example_without_the_whole_block_is_an_error_naming_it_or_skipped(tmp_path):
    rows = [{"question": "Q0?", "answer": answer(0)}, {"question": "Q1?", "answer": "<think>\nforgot to close"},
            {"question": "Q2?", "answer": answer(2)}]
    path = write_jsonl(tmp_path / "shots.jsonl", rows)
    with pytest.raises(DataError, match=r"shots\.jsonl:2: field 'answer': few-shot example: the prefix '<think>\\n' "
                                        r"opens <think>"):
        load_few_shot(path, shots=1, prefix=PREFIX)
    few = load_few_shot(path, shots=1, prefix=PREFIX, on_error="skip")
    assert [e.question for e in few.examples] == ["Q0?", "Q2?"]
    assert len(few.skipped) == 1 and "shots.jsonl:2" in few.skipped[0]
    assert len(load_few_shot(path, shots=3, prefix="").examples) == 3  # no block opened: nothing to check


def test_bad_example_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such few-shot file"):
        load_few_shot(tmp_path / "missing.jsonl", shots=1)
    no_answer = write_jsonl(tmp_path / "a.jsonl", [{"question": "Q?"}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'solution': few-shot example: an example needs an answer"):
        load_few_shot(no_answer, shots=1)
    two_turns = write_jsonl(tmp_path / "b.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"one user question and its answer; got the roles \['system', 'user'\]"):
        load_few_shot(two_turns, shots=1)
    with pytest.raises(ConfigError, match="few_shot.shots: 3 examples per row, but .* has 1 usable"):
        load_few_shot(write_jsonl(tmp_path / "c.jsonl", [{"question": "Q?", "answer": "A"}]), shots=3)
    with pytest.raises(DataError, match=r"d\.jsonl: cannot detect the data format from columns \['text'\]"):
        load_few_shot(write_jsonl(tmp_path / "d.jsonl", [{"text": "Q?"}]), shots=1)
    broken = tmp_path / "e.jsonl"
    broken.write_text('{"question": "Q?", "answer": "A"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.jsonl:2: few-shot example: invalid JSON"):
        load_few_shot(broken, shots=1)
    with pytest.raises(ConfigError, match="few_shot: expected prefill_kit.prompts.few_shot.load_few_shot"):
        RenderOptions(load_template("chatml"), few_shot=str(tmp_path / "c.jsonl"))


def test_the_shipped_examples_score_1_on_the_format_rewards():
    from prefill_kit.rewards import format_reward, think_format_reward

    few = load_few_shot(SHIPPED_EXAMPLES, shots=4, prefix=PREFIX)
    answers = [e.answer for e in few.examples]
    assert len(answers) == 8
    assert format_reward(answers) == think_format_reward(answers) == [1.0] * 8


# --- choosing ---------------------------------------------------------------------------------------------------

def few_shot(n=6, shots=3, seed=0, mode="turns"):
    return FewShot(tuple(Example(f"Q{i}?", answer(i), f"f:{i + 1}", i) for i in range(n)), shots, seed, mode)


def test_choice_depends_on_seed_and_row_index_only():
    a, b = few_shot(seed=1), few_shot(seed=2)
    picks = [choose_examples(a, i, "Row?") for i in range(20)]
    assert picks == [choose_examples(a, i, "Row?") for i in range(20)]
    assert all(len(p) == 3 == len(set(p)) for p in picks)
    assert len({tuple(p) for p in picks}) > 5  # rows differ from each other
    assert picks != [choose_examples(b, i, "Row?") for i in range(20)]


def test_an_example_asking_the_rows_own_question_is_never_used():
    few = few_shot(n=4, shots=4)
    for i in range(30):
        picks = choose_examples(few, i, "  Q2? ")  # the same question up to surrounding whitespace
        assert sorted(picks) == [0, 1, 3]
    assert sorted(choose_examples(few, 0, "Q9?")) == [0, 1, 2, 3]


def test_turns_go_after_the_system_message_and_system_mode_appends_to_it():
    examples = [Example("Q1?", "A1", "f:1", 0), Example("Q2?", "A2", "f:2", 1)]
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Row?"}
    assert with_examples([system, user], examples, "turns") == [
        system, {"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2"}, user]
    text = "Worked examples of the expected response format:\n\nQuestion: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2"
    assert with_examples([system, user], examples, "system") == [
        {"role": "system", "content": "Be brief.\n\n" + text}, user]
    assert with_examples([user], examples, "system") == [{"role": "system", "content": text}, user]
    parts = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert with_examples([parts, user], examples, "system") == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "\n\n" + text}]},
        user]
    assert with_examples([user], [], "system") == [user]


# --- rendering --------------------------------------------------------------------------------------------------

def test_turns_mode_on_a_shipped_template_renders_the_examples_before_the_row(tmp_path, shots_file, data_file, chatml):
    few = load_few_shot(shots_file, shots=2, seed=3, prefix=PREFIX)
    summary, rows = render(tmp_path, data_file, RenderOptions(chatml, PREFIX, few_shot=few))
    assert summary.rows_out == 10 and summary.shots_short == 0
    for i, row in enumerate(rows):
        a, b = row["few_shot_indices"]
        assert [a, b] == choose_examples(few, i, f"Row {i}?")
        assert row["prompt"] == (f"<|im_start|>user\nQ{a}?<|im_end|>\n<|im_start|>assistant\n{answer(a)}<|im_end|>\n"
                                 f"<|im_start|>user\nQ{b}?<|im_end|>\n<|im_start|>assistant\n{answer(b)}<|im_end|>\n"
                                 f"<|im_start|>user\nRow {i}?<|im_end|>\n<|im_start|>assistant\n<think>\n")
        assert row["prefix"] == PREFIX and row["solution"] == str(i)


@pytest.mark.parametrize("which", ["qwen3", "qwen3 (reference)", "deepseek-r1"])
def test_templates_that_drop_earlier_reasoning_stop_turns_mode_and_system_mode_works(tmp_path, shots_file, data_file,
                                                                                      which, request):
    template = request.getfixturevalue("qwen3_reference") if "reference" in which else load_template(which)
    few = load_few_shot(shots_file, shots=2, prefix=PREFIX)
    with pytest.raises(ConfigError, match=r"data\.jsonl:1: template .* rewrote the answer of few-shot example "
                                          r".*shots\.jsonl:\d: .*drop the <think> block.*--few-shot-mode system"):
        render(tmp_path, data_file, RenderOptions(template, PREFIX, few_shot=few, on_error="skip"))
    system = load_few_shot(shots_file, shots=2, mode="system", prefix=PREFIX)
    _, rows = render(tmp_path, data_file, RenderOptions(template, PREFIX, few_shot=system))
    for row in rows:
        system = "<|im_start|>system\n" if "qwen3" in which else "<｜begin▁of▁sentence｜>"
        assert row["prompt"].startswith(system + "Worked examples of the expected response format:\n\nQuestion: Q")
        assert all(answer(k) in row["prompt"] for k in row["few_shot_indices"])
        assert row["prompt"].endswith(f"Row {row['id']}?<|im_end|>\n<|im_start|>assistant\n<think>\n"
                                      if "qwen3" in which else f"Row {row['id']}?<｜Assistant｜><think>\n")


@pytest.mark.parametrize("mode", ["turns", "system"])
def test_the_reference_qwen3_template_through_transformers_gives_the_same_prompts(tmp_path, data_file, mode,
                                                                                   qwen3_reference, tiny_tokenizer):
    """Answers without reasoning survive Qwen3's history rewrite, so turns mode works there too; each prompt is
    what transformers' apply_chat_template makes of the conversation with the examples, plus the prefix."""
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": f"Q{i}?", "answer": f"It is {i}."} for i in range(3)])
    few = load_few_shot(plain, shots=2, mode=mode)
    _, rows = render(tmp_path, data_file, RenderOptions(qwen3_reference, "Let me see.", few_shot=few))
    hf = copy.copy(tiny_tokenizer)
    hf.chat_template = qwen3_reference.source
    for i, row in enumerate(rows):
        examples = [Example(f"Q{k}?", f"It is {k}.", "", k) for k in row["few_shot_indices"]]
        messages = with_examples([{"role": "user", "content": f"Row {i}?"}], examples, mode)
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Let me see."
        assert row["prompt"] == expected
        assert (f"<|im_start|>assistant\nIt is {row['few_shot_indices'][0]}.<|im_end|>" in row["prompt"]) == (
            mode == "turns")


def test_the_same_examples_with_any_num_proc_and_batch_size(tmp_path, shots_file, data_file, chatml):
    options = RenderOptions(chatml, PREFIX, few_shot=load_few_shot(shots_file, shots=3, seed=7, prefix=PREFIX))
    _, one = render(tmp_path, data_file, options)
    _, many = render(tmp_path, data_file, options, num_proc=2, batch_size=3)
    assert many == one
    assert [r["few_shot_indices"] for r in one] == [choose_examples(options.few_shot, i, f"Row {i}?")
                                                    for i in range(10)]


def test_the_same_examples_through_render_dataset_with_processes(shots_file, data_file, chatml):
    import datasets

    from prefill_kit.prompts.dataset import render_dataset

    few = load_few_shot(shots_file, shots=3, seed=7, prefix=PREFIX)
    data = datasets.load_dataset("json", data_files=data_file, split="train")
    one = render_dataset(data, template=chatml, prefix=PREFIX, few_shot=few)
    many = render_dataset(data, template=chatml, prefix=PREFIX, few_shot=few, num_proc=2, batch_size=3)
    assert many.to_list() == one.to_list()
    assert one["few_shot_indices"] == [choose_examples(few, i, f"Row {i}?") for i in range(10)]


def test_a_row_gets_no_example_with_its_own_question(tmp_path, chatml):
    shots = write_jsonl(tmp_path / "s.jsonl", [{"question": f"Row {i}?", "answer": answer(i)} for i in range(3)])
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"Row {i}?", "solution": str(i)} for i in range(5)])
    few = load_few_shot(shots, shots=3, prefix=PREFIX)
    summary, rows = render(tmp_path, data, RenderOptions(chatml, PREFIX, few_shot=few))
    for i, row in enumerate(rows):
        assert i not in row["few_shot_indices"]
        assert len(row["few_shot_indices"]) == (2 if i < 3 else 3)
    assert summary.shots_short == 3


def test_over_long_rows_get_fewer_shots_before_they_are_rejected(tmp_path, shots_file, chatml, tiny_tokenizer):
    long_row = {"messages": [{"role": "user", "content": "word " * 400}], "solution": "0"}
    rows = [{"messages": [{"role": "user", "content": f"Row {i}?"}], "solution": str(i)} for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", [*rows, long_row])
    few = load_few_shot(shots_file, shots=3, prefix=PREFIX)
    full = RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer, few_shot=few)
    _, unlimited = render(tmp_path, data, full)
    lengths = [r["num_prompt_tokens"] for r in unlimited[:6]]
    limit = sorted(lengths)[2]  # some rows fit with all three examples, the others must lose some
    limited = RenderOptions(chatml, PREFIX, tokenizer=tiny_tokenizer, few_shot=few, max_prompt_tokens=limit,
                            on_error="skip")
    summary, out = render(tmp_path, data, limited)
    assert summary.rejected == 1 and "prompt too long" in summary.first_reject["reason"]  # the long row, even 0-shot
    assert summary.shots_trimmed == sum(n > limit for n in lengths) > 0
    for before, after in zip(unlimited[:6], out, strict=True):
        assert after["num_prompt_tokens"] <= limit
        kept = after["few_shot_indices"]
        assert kept == before["few_shot_indices"][:len(kept)]  # fewer shots are the first ones of the choice
        if before["num_prompt_tokens"] <= limit:
            assert after == before
        else:  # the most shots that fit: one more would be over
            assert len(kept) < 3
            more = render_one(chatml, tiny_tokenizer, few, before, len(kept) + 1)
            assert more > limit


def render_one(template, tokenizer, few, row, shots: int) -> int:
    from prefill_kit.prompts.render import render_row

    index = int(row["solution"])
    rendered = render_row({"messages": [{"role": "user", "content": f"Row {index}?"}]},
                          RenderOptions(template, PREFIX, few_shot=few), "messages", index, shots)
    return len(tokenizer(rendered["prompt"], add_special_tokens=False).input_ids)


# --- CLI and training config ------------------------------------------------------------------------------------

def test_cli_renders_the_shipped_examples_in_one_command(tmp_path):
    out = tmp_path / "out.jsonl"
    result = run_cli("render", str(REPO / "examples" / "math_tiny.jsonl"), "-o", str(out), "--prefix", r"<think>\n",
                     "--few-shot", str(SHIPPED_EXAMPLES), "--shots", "2", "--few-shot-seed", "1")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert len(rows) == 32 and all(len(r["few_shot_indices"]) == 2 for r in rows)
    assert rows[0]["prompt"].count("<|im_start|>assistant\n<think>\n") == 3  # two examples and the open turn
    assert "few-shot: 2 of 8 examples from" in result.stderr
    assert "rows got fewer" not in result.stderr  # no --max-prompt-tokens, no count of rows trimmed for it


def test_cli_few_shot_errors_and_skipped_examples(tmp_path, data_file):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q0?", "answer": answer(0)},
                                               {"question": "Q1?", "answer": "7"},
                                               {"question": "Q2?", "answer": answer(2)}])
    result = run_cli("render", data_file, "-o", str(tmp_path / "o.jsonl"), "--prefix", r"<think>\n", "--few-shot", bad,
                     "--shots", "1")
    assert result.returncode == 2 and "bad.jsonl:2: field 'answer'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.jsonl").exists()
    result = run_cli("render", data_file, "-o", str(tmp_path / "o.jsonl"), "--prefix", r"<think>\n", "--few-shot", bad,
                     "--shots", "1", "--on-error", "skip")
    assert result.returncode == 0 and "warning: skipped" in result.stderr and "bad.jsonl:2" in result.stderr
    # indices are rows of the examples file, whatever was left out before them
    assert {tuple(r["few_shot_indices"]) for r in read_jsonl(tmp_path / "o.jsonl")} == {(0,), (2,)}
    result = run_cli("render", data_file, "--shots", "2")
    assert result.returncode == 2 and "--shots: give the examples with --few-shot FILE" in result.stderr
    result = run_cli("render", data_file, "--few-shot-mode", "system")
    assert result.returncode == 2 and "--few-shot-mode: give the examples with --few-shot FILE" in result.stderr


def test_training_config_renders_with_few_shot(tmp_path, shots_file, data_file, tiny_tokenizer):
    from prefill_kit.config import config_from_dict
    from prefill_kit.prompts.training_data import load_training_data

    raw = {"model": {"path": "m"}, "output": {"dir": "o"},
           "data": {"path": data_file, "prefix": PREFIX, "template": "chatml",
                    "few_shot": {"path": shots_file, "shots": 2, "seed": 5}}}
    config = config_from_dict(raw)
    assert config.data.few_shot.mode == "turns" and config.data.few_shot.shots == 2
    dataset = load_training_data(config.data, tiny_tokenizer)
    few = load_few_shot(shots_file, shots=2, seed=5, prefix=PREFIX)
    assert dataset["few_shot_indices"] == [choose_examples(few, i, f"Row {i}?") for i in range(10)]
    assert all(answer(k) in row["prompt"] for row in dataset for k in row["few_shot_indices"])
    with pytest.raises(ConfigError, match=r"data\.few_shot\.mode: expected one of turns, system"):
        config_from_dict({**raw, "data": {**raw["data"], "few_shot": {"path": shots_file, "mode": "inline"}}})
    with pytest.raises(ConfigError, match=r"data\.few_shot\.path: required"):
        config_from_dict({**raw, "data": {**raw["data"], "few_shot": {"shots": 2}}})
    assert config_from_dict({**raw, "data": {**raw["data"], "few_shot": None}}).data.few_shot is None


def test_training_config_refuses_few_shot_on_rendered_data(tmp_path, shots_file, tiny_tokenizer):
    from prefill_kit.config import config_from_dict
    from prefill_kit.prompts.training_data import load_training_data

    rendered = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "x", "prefix": "", "solution": "1"}])
    config = config_from_dict({"model": {"path": "m"}, "output": {"dir": "o"},
                               "data": {"path": rendered, "few_shot": {"path": shots_file}}})
    with pytest.raises(ConfigError, match="already rendered"):
        load_training_data(config.data, tiny_tokenizer)


def test_a_multi_turn_rows_own_question_is_its_last_user_message(tmp_path, chatml):
    # The row asks "Row 1?" last; its first user message asks "Row 0?". Only example 1 is the row's own question.
    from prefill_kit.prompts.few_shot import row_question

    messages = [{"role": "user", "content": "Row 0?"}, {"role": "assistant", "content": "0"},
                {"role": "user", "content": "Row 1?"}]
    assert row_question(messages) == "Row 1?"
    shots = write_jsonl(tmp_path / "s.jsonl", [{"question": f"Row {i}?", "answer": answer(i)} for i in range(3)])
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    few = load_few_shot(shots, shots=2, prefix=PREFIX)
    _, [row] = render(tmp_path, data, RenderOptions(chatml, PREFIX, few_shot=few))
    assert sorted(row["few_shot_indices"]) == [0, 2]
