"""Reward rules on hand-written cases: what each reward scores, prefix included."""

from __future__ import annotations

import json
import math

import pytest

from prefill_kit.errors import ConfigError
from prefill_kit.rewards import (
    AccuracyReward,
    available_rewards,
    choice_accuracy_reward,
    extract_gold,
    extract_prediction,
    format_reward,
    get_reward,
    parse_reward_spec,
    tag_count_reward,
    think_format_reward,
)
from prefill_kit.rewards.numeric import fast_equal
from prefill_kit.rewards.response import join_prefix

THINK = "<think>\n"


@pytest.fixture(scope="module")
def accuracy():
    return AccuracyReward(timeout=5.0, num_workers=1)


# --- what is scored -----------------------------------------------------------------------------------------------

def test_prefix_is_always_joined_never_guessed_away():
    assert join_prefix(THINK, "a</think>") == "<think>\na</think>"
    assert join_prefix(THINK, "<think>\na</think>") == "<think>\n<think>\na</think>"
    assert join_prefix(None, "a") == "a"
    assert join_prefix("", "a") == "a"


def test_a_doubled_prefix_fails_format():
    # The model wrote <think> again after the prefilled one: the user sees two.
    doubled = "<think>\nr</think>\n<answer>4</answer>"
    assert format_reward([doubled], prefix=[THINK]) == [0.0]
    assert format_reward([doubled]) == [1.0]  # completions that already hold the prefix: pass none


def test_unfinished_thinking_earns_no_accuracy(accuracy):
    # Never closes </think>, ends on the right number: 0.0, below a well-formatted wrong answer's format score.
    rambling = "Let me try 3, 4, 5, 6, 7, 8"
    assert accuracy([rambling], prefix=[THINK], solution=["8"]) == [0.0]
    assert accuracy(["<think>\n" + rambling], solution=["8"]) == [0.0]  # opened by the completion itself
    assert accuracy([rambling + "\n</think>\n<answer>8</answer>"], prefix=[THINK], solution=["8"]) == [1.0]
    assert accuracy([rambling], solution=["8"]) == [1.0]  # no reasoning block was opened: plain answer
    lenient = AccuracyReward(timeout=5.0, num_workers=1, require_closed_think=False)
    assert lenient([rambling], prefix=[THINK], solution=["8"]) == [1.0]
    closed_then_reopened = "r</think>\n8\n<think>\nmore"
    assert accuracy([closed_then_reopened], prefix=[THINK], solution=["8"]) == [0.0]


def test_unfinished_thinking_earns_no_choice_accuracy():
    from prefill_kit.rewards import ChoiceAccuracyReward

    choice = ChoiceAccuracyReward()
    assert choice(["the answer is B"], prefix=[THINK], solution=["B"]) == [0.0]
    assert choice(["r</think>the answer is B"], prefix=[THINK], solution=["B"]) == [1.0]
    assert ChoiceAccuracyReward(require_closed_think=False)(["the answer is B"], prefix=[THINK],
                                                            solution=["B"]) == [1.0]


def test_prefilled_think_completion_passes_format_only_with_prefix():
    completion = "reasoning\n</think>\n<answer>4</answer>"
    assert format_reward([completion]) == [0.0]  # TRL/open-r1's situation: the <think> is in the prompt
    assert format_reward([completion], prefix=[THINK]) == [1.0]
    conversational = [[{"role": "assistant", "content": completion}]]
    assert format_reward(conversational, prefix=[THINK]) == [1.0]
    assert think_format_reward([completion], prefix=[THINK]) == [1.0]


def test_unknown_kwargs_are_ignored():
    assert format_reward(["<think>a</think><answer>b</answer>"], trainer_state=object(), prompts=["p"],
                         completion_ids=[[1, 2]], log_extra=print) == [1.0]


# --- format rules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>r</think><answer>a</answer>", 1.0),
    ("  \n<think>\nr\n</think>\n\n<answer>\na\n</answer>\n ", 1.0),  # surrounding/between whitespace allowed
    ("<think>\nr\n</think>\n<answer>\na\n</answer>\ntrailing junk", 0.0),  # open-r1's multi-line `$` loophole
    ("<think>r</think>text<answer>a</answer>", 0.0),  # something between the blocks
    ("<think>r</think><think>s</think><answer>a</answer>", 0.0),  # a tag twice
    ("<answer>a</answer><think>r</think>", 0.0),  # wrong order
    ("<think>r<answer>a</answer></think>", 0.0),  # nested
    ("<think>r</think>", 0.0),
    ("", 0.0),
])
def test_format_reward_rule(text, expected):
    assert format_reward([text]) == [expected]


def test_format_reward_tag_names_are_configurable():
    reward = get_reward("format", think_tag="reasoning", answer_tag="final")
    assert reward(["<reasoning>r</reasoning><final>a</final>"]) == [1.0]
    assert reward(["<think>r</think><answer>a</answer>"]) == [0.0]


@pytest.mark.parametrize("text, expected", [
    ("<think>r</think>answer", 1.0),
    ("<think>r</think>   ", 0.0),  # nothing after the block
    ("<think>r</think>a<think>s</think>b", 0.0),  # two blocks
    ("x<think>r</think>a", 0.0),  # does not start with the block
    ("<think>r never closed", 0.0),
])
def test_think_format_rule(text, expected):
    assert think_format_reward([text]) == [expected]


def test_tag_count_gives_a_quarter_per_tag_line():
    full = "<think>\nr\n</think>\n<answer>\na\n</answer>"
    assert tag_count_reward([full]) == [1.0]
    assert tag_count_reward(["r\n</think>\n<answer>\na\n</answer>"]) == [0.75]  # no `<think>\n` ...
    assert tag_count_reward(["r\n</think>\n<answer>\na\n</answer>"], prefix=[THINK]) == [1.0]  # ... unless prefixed
    assert tag_count_reward(["nothing"]) == [0.0]


# --- answer extraction and the fast path --------------------------------------------------------------------------

@pytest.mark.parametrize("solution, gold", [
    ("Natalia sold 48 clips...\n#### 72", "72"),
    (r"so $x=\boxed{\frac{1}{2}}$ and later \boxed{3}", "3"),
    ("<answer> 12 </answer>", "12"),
    (r"\frac{14}{3}", r"\frac{14}{3}"),
    ("   ", None),
    (r"the result is \boxed{12", None),  # a box that never closes: malformed gold, not a plain value
])
def test_extract_gold(solution, gold):
    assert extract_gold(solution) == gold


@pytest.mark.parametrize("response, pred", [
    ("<think>the answer is 3</think><answer>5</answer>", "5"),  # after </think>, <answer> first
    (r"<think>\boxed{1}</think> so \boxed{2} and \boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # last box after </think>
    ("So the answer is $42$. I hope it is correct.", "42"),
    ("We get 3 apples, then 7 pears, total 10", "10"),
    (r"unclosed \boxed{12 and then \boxed{7}", "7"),
    (r"only unclosed \boxed{12", "12"),  # no complete box: falls through to the last number
    ("no answer here", None),
])
def test_extract_prediction(response, pred):
    assert extract_prediction(response) == pred


@pytest.mark.parametrize("gold, pred, expected", [
    ("1,000", "1000", True),
    (r"\$5.50", "5.5", True),
    (r"50\%", "50", True),
    (r"50\%", "0.5", True),
    ("0.5", "50", False),
    (r"\frac{3}{4}", "0.75", True),
    (r"\dfrac{3}{4}", "3/4", True),
    (r"1\frac{1}{4}", r"\frac{5}{4}", True),  # MATH's mixed numbers
    ("6290000", "6287000", False),  # integers: exact, no tolerance
    ("A", "C", False),
    (r"\frac{\sqrt{3}}{2}", "0.866", None),  # not decidable here: goes to math-verify
])
def test_fast_equal(gold, pred, expected):
    assert fast_equal(gold, pred) is expected


# --- accuracy -----------------------------------------------------------------------------------------------------

def test_accuracy_on_hand_cases(accuracy):
    completions = [
        "reasoning\n</think>\n<answer>72</answer>",  # prefilled think, GSM8K gold
        r"</think> The answer is \boxed{\frac{\sqrt{3}}{2}}",  # symbolic: needs math-verify
        r"</think> \boxed{\frac{\sqrt{3}}{3}}",
        "</think> 71",
        "anything",
    ]
    solutions = ["#### 72", r"\frac{\sqrt3}{2}", r"\frac{1}{\sqrt{3}}", "#### 72", None]
    assert accuracy(completions, solution=solutions, prefix=[THINK] * 5) == [1.0, 1.0, 1.0, 0.0, None]
    assert accuracy(completions[:1], solution=[r"\boxed{72"]) == [None]  # unparseable gold: TRL skips the row


def test_accuracy_reads_the_answer_column_too(accuracy):
    assert accuracy(["so 4"], answer=["4"]) == [1.0]


def test_accuracy_without_gold_column_is_a_config_error(accuracy):
    with pytest.raises(ConfigError, match="solution"):
        accuracy(["4"])


@pytest.mark.parametrize("gold, pred", [
    (r"\frac{1}{2004!}", r"\frac{1}{2006!}"),  # math-verify: chop=True flushes tiny differences to 0
    ("4", r"4\sqrt(2)"),  # math-verify: malformed sqrt becomes a LaTeX line break, the rest is dropped
    ("4", r"4\sqrt{2}"),
    ("1-1/e", "1+1/e"),  # math-verify: the plain-text extractor keeps only the first number
    (r"1 - \frac{1}{\mathrm{e}}", r"1 + \frac{1}{\mathrm{e}}"),  # math-verify: \mathrm{e} truncates the match
    (r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}"),
])
def test_known_math_verify_false_positives_score_zero(accuracy, gold, pred):
    assert accuracy([rf"\boxed{{{pred}}}"], solution=[gold]) == [0.0]
    # and the true answer is still accepted, so the guard is not simply rejecting everything
    assert accuracy([rf"\boxed{{{gold}}}"], solution=[gold]) == [1.0]


def test_accuracy_counts_how_items_were_decided():
    reward = AccuracyReward(num_workers=1)
    reward(["1", r"\boxed{\sqrt{4}}", "x"], solution=["1", "2", None])
    assert (reward.stats.items, reward.stats.fast_path, reward.stats.symbolic, reward.stats.gold_unparseable) == \
        (3, 1, 1, 1)


# --- choice, length, repetition -----------------------------------------------------------------------------------

def test_choice_accuracy():
    completions = ["<think>maybe A</think><answer>(B)</answer>", r"so \boxed{C}", "The answer is D.", "hmm"]
    assert choice_accuracy_reward(completions, solution=["B", "(C)", "D) fifty", "E"]) == [1.0, 1.0, 1.0, 0.0]
    assert choice_accuracy_reward(["A"], solution=["42"]) == [None]


def test_cosine_length_follows_the_schedule_and_clamps():
    reward = get_reward("cosine_length", max_len=100)
    ids = [[0] * 50, [0] * 50, [0] * 0, [0] * 400]
    scores = reward(["4", "5", "4", "4"], solution=["4"] * 4, completion_ids=ids)
    # half way: correct is the midpoint of [0.5, 1.0], wrong of [-1.0, -0.5]; length 0: max; beyond max_len: clamped
    assert scores == pytest.approx([0.75, -0.75, 1.0, 0.5])
    by_chars = get_reward("cosine_length", max_len=4, unit="chars")
    assert by_chars(["44"], solution=["44"]) == pytest.approx([0.5 + 0.25 * (1 + math.cos(math.pi / 2))])
    with pytest.raises(ConfigError, match="completion_ids"):
        reward(["4"], solution=["4"])


def test_soft_overlong_matches_dapo():
    reward = get_reward("soft_overlong", max_completion_len=100, soft_punish_cache=20)
    assert reward(["x"] * 4, completion_ids=[[0] * 80, [0] * 90, [0] * 100, [0] * 101]) == [0.0, -0.5, 0.0 - 1.0,
                                                                                            -1.0]


def test_repetition_penalty():
    words = get_reward("repetition_penalty", ngram_size=2, max_penalty=-1.0)
    # "a a a a a": 4 bigrams, 1 unique -> (1 - 1/4) * -1
    assert words(["a a a a a", "a b c d", "a"]) == [-0.75, 0.0, 0.0]
    tokens = get_reward("repetition_penalty", ngram_size=2, unit="tokens")
    assert tokens(["ignored"], completion_ids=[[5, 5, 5, 5, 5]]) == [-0.75]
    with pytest.raises(ConfigError, match="positive"):
        get_reward("repetition_penalty", max_penalty=0.5)


# --- registry -----------------------------------------------------------------------------------------------------

def test_registry_names():
    assert available_rewards() == sorted(["format", "think_format", "accuracy", "choice_accuracy", "tag_count",
                                          "cosine_length", "repetition_penalty", "soft_overlong"])
    for name in available_rewards():
        params = {"max_len": 10} if name == "cosine_length" else {}
        assert callable(get_reward(name, **params))
    with pytest.raises(ConfigError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_reward("format", colour="red")


def test_reward_spec_string_and_list():
    spec = parse_reward_spec("format, accuracy:2.0, prefill_kit.rewards.format:think_format_reward:0.5")
    assert [(w.name, w.weight) for w in spec] == [("format", 1.0), ("accuracy", 2.0),
                                                  ("prefill_kit.rewards.format:think_format_reward", 0.5)]
    assert spec[2].fn is think_format_reward
    listed = parse_reward_spec([{"name": "cosine_length", "weight": 0.5, "max_len": 64}, "format"])
    assert [(w.name, w.weight) for w in listed] == [("cosine_length", 0.5), ("format", 1.0)]
    assert listed[0].fn.max_len == 64
    for bad in ["format:x", "", "no.such.module:fn"]:
        with pytest.raises(ConfigError):
            parse_reward_spec(bad)


def test_rewards_pickle_for_worker_processes():
    import pickle

    for name in available_rewards():
        fn = get_reward(name, **({"max_len": 10} if name == "cosine_length" else {}))
        assert pickle.loads(pickle.dumps(fn)).__name__ == fn.__name__


# --- CLI ----------------------------------------------------------------------------------------------------------

def test_cli_scores_and_writes_rows(tmp_path, capsys):
    from prefill_kit.cli import main

    rows = [{"completion": "r\n</think>\n<answer>4</answer>", "solution": "#### 4"},
            {"completion": "no tags 5", "solution": "#### 4"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["reward", str(src), "--rewards", "format,accuracy:2.0", "--prefix", THINK, "-o", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["format"], r["accuracy"], r["reward"]) for r in written] == [(1.0, 1.0, 3.0), (0.0, 0.0, 0.0)]
    table = capsys.readouterr().out
    assert "accuracy (x2)" in table and "0.5000" in table and "lowest-scoring" in table


def test_cli_names_the_bad_line(tmp_path, capsys):
    from prefill_kit.cli import main

    src = tmp_path / "bad.jsonl"
    src.write_text('{"completion": "ok"}\n{"solution": "4"}\n')
    assert main(["reward", str(src), "--rewards", "format"]) == 2
    assert f"{src}:2: field 'completion'" in capsys.readouterr().err


# --- the answer is read after the thinking; numbers keep their sign and their doubt (issue 20) ------------------

def test_accuracy_reads_the_answer_after_the_thinking_not_inside_it(accuracy):
    response = "<think>\nfirst guess \\boxed{5}, but no\n</think>\nThe answer is 7"
    assert extract_prediction(response) == "7"
    assert accuracy([response], solution=["7"]) == [1.0]
    assert accuracy([response], solution=["5"]) == [0.0]


def test_choice_accuracy_reads_the_letter_after_the_thinking_not_inside_it():
    response = "<think>\nmaybe \\boxed{B}? <answer>B</answer> no\n</think>\nSo: C"
    assert choice_accuracy_reward([response], solution=["C"]) == [1.0]
    assert choice_accuracy_reward([response], solution=["B"]) == [0.0]


@pytest.mark.parametrize("gold, pred, expected", [
    ("-3/4", "3/4", False),
    ("-3/4", "-0.75", True),
    ("3/4", "-0.75", False),
    ("-3/4", r"-\frac{3}{4}", True),
    ("1/3", "0.3333", None),  # a rounding of 1/3: the symbolic check decides, not a hasty False
    ("0.3333", r"\frac{1}{3}", None),
    ("3.14", "3.1416", None),
    ("3.14", "3.5", False),  # not close: certainly different
])
def test_fast_equal_keeps_the_sign_and_defers_near_decimals(gold, pred, expected):
    assert fast_equal(gold, pred) is expected


def test_a_slash_fraction_keeps_its_sign():
    from fractions import Fraction

    from prefill_kit.rewards.numeric import to_number

    assert to_number("-3/4") == Fraction(-3, 4)
    assert to_number("+3/4") == to_number("3/4") == Fraction(3, 4)
