"""prefill-kit inspect: logged completions, ranked and filtered, as text and as a self-contained HTML page."""

from __future__ import annotations

import html
import json
import re

import pytest

from prefill_kit.cli import main
from prefill_kit.config import config_from_dict
from prefill_kit.rewards import WeightedReward
from prefill_kit.runs.inspect import html_page, load_completions, rows_as_text, select, show
from tests.conftest import REPO

PREFIX = "<think>\n"
HEADER = re.compile(r"^step (\d+) · prompt (\d+) · reward (\S+)", re.M)




def character_variety(completions, **kwargs):
    """Differs between random completions, so the ranking has something to rank."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


@pytest.fixture(scope="module")
def logged_run(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """A real built-in run on the tiny model that logged every step's completions."""
    from prefill_kit.backends import builtin

    run_dir = tmp_path_factory.mktemp("run")
    config = config_from_dict({
        "model": {"path": str(tiny_model_dir)},
        "data": {"path": str(REPO / "examples" / "math_tiny.jsonl"), "prefix": PREFIX},
        "grpo": {"num_generations": 2, "max_completion_length": 8},
        "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 2, "seed": 0},
        "output": {"dir": str(run_dir), "save_steps": 0, "log_completions_steps": 1}})
    builtin.train(config, reward_funcs=[WeightedReward("variety", character_variety, 1.0)], progress=False)
    return run_dir


def test_worst_3_prints_the_three_lowest_reward_completions(logged_run, capsys):
    rows = [json.loads(line) for line in (logged_run / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # 2 steps x 4 completions
    expected = sorted(rows, key=lambda r: r["reward"])[:3]
    assert expected[2]["reward"] < max(r["reward"] for r in rows)  # the run has better rows that must not show

    assert main(["inspect", str(logged_run), "--worst", "3", "--color", "never"]) == 0
    out = capsys.readouterr().out
    headers = HEADER.findall(out)
    assert [(int(s), int(p)) for s, p, _ in headers] == [(r["step"], r["prompt_index"]) for r in expected]
    assert [float(r) for _, _, r in headers] == pytest.approx([r["reward"] for r in expected], rel=1e-3)
    for row in expected:  # the prefix is marked, the completion follows it
        assert "«<think>\n    »" + show(row["completion"]).replace("\n", "\n    ") in out


def test_html_holds_the_same_completions_in_one_self_contained_page(logged_run, tmp_path, capsys):
    page = tmp_path / "worst.html"
    assert main(["inspect", str(logged_run), "--worst", "3", "--html", str(page)]) == 0
    rows = [json.loads(line) for line in (logged_run / "completions.jsonl").read_text().splitlines()]
    expected = sorted(rows, key=lambda r: r["reward"])[:3]
    text = page.read_text(encoding="utf-8")
    assert text.count("<tr class=") == 3
    for row in expected:
        assert ('<mark class="prefix">&lt;think&gt;\n</mark>' + html.escape(show(row["completion"]))) in text
    assert not re.search(r"<script|<link|<img|src=|href=|@import|url\(", text)  # nothing fetched, nothing run


# --------------------------------------------------------------------------------------------------- a hand-made log


def row(step, prompt, completion, reward, accuracy, *, prefix=PREFIX, truncated=False):
    return {"step": step, "prompt_index": prompt, "prefix": prefix, "completion": completion,
            "completion_length": len(completion), "truncated": truncated, "format": 1.0, "accuracy": accuracy,
            "reward": reward, "advantage": 0.0}


ROWS = [row(1, 0, "a", 0.5, 0.0), row(1, 0, "b", None, None), row(1, 1, "c", 2.0, 1.0),
        row(2, 3, "d", -1.0, None), row(2, 3, "e", 0.5, 0.5)]


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def completions(rows):
    return [r["completion"] for r in rows]


def test_select_ranks_filters_and_leaves_unscored_rows_out(log_file):
    rows = load_completions(log_file.parent)
    assert completions(select(rows, worst=2)) == ["d", "a"]  # None cannot be ranked
    assert completions(select(rows, best=2)) == ["c", "a"]  # ties keep log order: a before e
    assert completions(select(rows, best=5, reward="accuracy")) == ["c", "e", "a"]
    assert completions(select(rows, step=2)) == ["d", "e"]
    assert completions(select(rows, step=1, worst=1)) == ["a"]
    assert completions(select(rows, reward="accuracy")) == ["a", "e", "c", "b", "d"]  # sorted, None last
    assert completions(select(rows)) == completions(ROWS)


def test_bad_requests_say_what_exists(log_file, capsys):
    assert main(["inspect", str(log_file), "--step", "7"]) == 2
    assert "step 7 was not logged; logged steps: 1, 2" in capsys.readouterr().err
    assert main(["inspect", str(log_file), "--worst", "1", "--reward", "brevity"]) == 2
    assert "no reward 'brevity' in the log; rewards: format, accuracy, reward" in capsys.readouterr().err
    assert main(["inspect", str(log_file.parent / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", str(log_file), "--worst", "1", "--best", "1"])


def test_a_row_that_is_not_a_completion_log_row_is_located(tmp_path, capsys):
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"step": 1}) + "\n", encoding="utf-8")
    assert main(["inspect", str(path)]) == 2
    assert f"{path}:2: field 'prompt_index': missing" in capsys.readouterr().err


def test_model_output_cannot_inject_markup_or_terminal_escapes(tmp_path, capsys):
    nasty = row(1, 0, "<script>alert('x')</script> & \x1b[2J", 0.0, 0.0, prefix="<b>\n")
    page = html_page([nasty])
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; \\x1b[2J" in page
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps(nasty) + "\n", encoding="utf-8")
    assert main(["inspect", str(path), "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out and "\\x1b[2J" in out  # shown, not executed
    assert "\x1b[1;36m<b>\n    \x1b[0m<script>" in out  # the prefix highlighted, the completion after it


def test_question_and_solution_show_with_each_completion_in_text_and_html(tmp_path, capsys):
    traced = {**row(1, 0, "<answer>7</answer>", 0.0, 0.0), "question": "Tom has 12 apples\nand gives 5 away?",
              "solution": "7 <b>"}
    untraced = row(1, 1, "x", 1.0, 1.0)
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (traced, untraced)), encoding="utf-8")
    assert main(["inspect", str(path), "--worst", "1", "--color", "never", "--html", str(tmp_path / "p.html")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 1 · prompt 0 · reward 0 · advantage 0 · format 1 · accuracy 0 · 18 tokens\n"
                          "question: Tom has 12 apples\n          and gives 5 away?\n"
                          "solution: 7 <b>\n    «<think>\n    »<answer>7</answer>")
    assert "question" not in rows_as_text([untraced]) and "solution" not in rows_as_text([untraced])
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    assert "<th>prompt</th><th>question</th><th>solution</th><th>format</th>" in page  # not taken for rewards
    assert ('<td class="text context">Tom has 12 apples\nand gives 5 away?</td>'
            '<td class="text context">7 &lt;b&gt;</td>') in page
    assert "question" not in html_page([untraced])  # a log without them has no such columns
