"""Rewards never raise on odd input, stay within their time bound from any thread, and agree with math-verify's
own test cases except where we differ on purpose."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefill_kit.rewards import AccuracyReward, available_rewards, get_reward

from .conftest import REFERENCE_ABSENT, SHARED_REFERENCE

HANG = r"\boxed{\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}"
NASTY = [None, "", "x" * 1_000_000, "\x00\xff\ud7ff binary \x1b[0m junk", "{{{{}", "}}}{", r"\boxed{",
         r"\boxed{" * 5000, r"\frac{" * 3000 + "1" + "}{2}" * 3000, "$" * 999, "</think>" * 3, "<answer>",
         b"\xff\xfe bytes",
         [{"role": "assistant"}], [{"role": "assistant", "content": None}], 12345]


def _params(name: str) -> dict:
    return {"max_len": 10, "unit": "chars"} if name == "cosine_length" else \
        {"unit": "chars"} if name == "soft_overlong" else {}


@pytest.fixture(scope="module")
def accuracy():
    return AccuracyReward(timeout=5.0, num_workers=2, min_pool_batch=2)


def test_nasty_inputs_never_raise(accuracy):
    for name in available_rewards():
        reward = accuracy if name == "accuracy" else get_reward(name, **_params(name))
        scores = reward(NASTY, solution=NASTY, prefix=["<think>\n"] * len(NASTY))
        assert len(scores) == len(NASTY), name
        assert all(s is None or isinstance(s, float) for s in scores), name


@pytest.mark.timing  # a bound on wall time, with slack for a loaded machine
def test_hang_case_returns_within_the_bound_and_is_counted():
    reward = AccuracyReward(timeout=2.0, num_workers=1)
    reward.warm_up()
    start = time.monotonic()
    assert reward([HANG, r"\boxed{\sqrt{4}}"], solution=["3", "2"]) == [0.0, 1.0]
    # the bound plus slack for a loaded 2-core machine; without the bound the HANG case runs for minutes
    assert time.monotonic() - start < 2.0 + 10.0
    assert reward.stats.timeouts == 1
    # the killed worker was replaced: the pool still answers
    assert reward([r"\boxed{\sqrt{9}}"], solution=["3"]) == [1.0]


def test_works_from_a_non_main_thread(accuracy):
    out = []
    thread = threading.Thread(target=lambda: out.append(accuracy([r"\boxed{\frac{\sqrt{3}}{2}}", "7"],
                                                                 solution=[r"\frac{\sqrt3}{2}", "#### 8"])))
    thread.start()
    thread.join(timeout=60)
    assert out == [[1.0, 0.0]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(completion=st.lists(st.sampled_from(list("{}\\$()<>/ab01 .,#=^_-\n") +
                                           ["\\boxed{", "\\frac{", "</think>", "<answer>", "</answer>", "<think>",
                                            "answer is", "####"]), max_size=60).map("".join) | st.text(max_size=200),
       solution=st.text(max_size=40))
def test_random_text_never_raises(accuracy, completion, solution):
    for name in ("format", "think_format", "tag_count", "choice_accuracy", "repetition_penalty"):
        assert len(get_reward(name)([completion], solution=[solution])) == 1
    assert accuracy([completion], solution=[solution])[0] in (0.0, 1.0, None)
    from prefill_kit.rewards.extract import extract_gold, extract_prediction
    from prefill_kit.rewards.numeric import fast_equal

    gold, pred = extract_gold(solution), extract_prediction(completion)
    if gold and pred:
        assert fast_equal(gold, pred) in (True, False, None)


# --- math-verify's own cases ----------------------------------------------------------------------------------------
# Math-Verify's tests parse gold and prediction with its own extraction (any LaTeX or expression anywhere in the
# text) and sometimes non-default options. We extract one final answer (last \boxed{}, "the answer is", a whole math
# span, else the last number) and apply the false-positive guards, so we differ on purpose where:
#  - the prediction holds several \boxed{} answers or a list spread over the text (we take the last box);
#  - a case needs options we do not expose (`precision`, `strict=False`, set-relation comparison, string targets);
#  - math-verify's expected True is one of its false positives (1-1/e vs 1+1/e, ...);
#  - our fallback takes the last number where math-verify finds nothing ("AZYUK2A" -> 2) or a math span it rejects
#    because of a line break inside `$ ... $`.
# The test pins the overall agreement and that every case we score 1 where math-verify expects 0 is a listed one.
CASES = SHARED_REFERENCE / "data" / "math_verify_testcases" / "math_verify_test_cases.jsonl"
ACCEPTED_WHERE_MATH_VERIFY_REJECTS = {("2", "AZYUK2A"), ("$9$", "Answer $ \n 9 \n $"),
                                      ("$9$", "Answer \\( \n 9 \n \\)")}


def test_math_verify_cases(accuracy):
    if not CASES.exists():
        pytest.skip(f"Math-Verify's test cases not available: {CASES} ({REFERENCE_ABSENT})")
    rows = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    scores = accuracy([r["pred"] for r in rows], solution=[r["gold"] for r in rows])
    expected = [bool(r.get("expected", r.get("result"))) for r in rows]
    agree = sum((s == 1.0) == e for s, e in zip(scores, expected, strict=True))
    extra_accepts = {(r["gold"], r["pred"])
                     for r, s, e in zip(rows, scores, expected, strict=True) if s == 1.0 and not e}
    assert extra_accepts <= ACCEPTED_WHERE_MATH_VERIFY_REJECTS
    assert agree / len(rows) >= 0.8, f"agreement {agree}/{len(rows)}"
