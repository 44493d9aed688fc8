"""`accuracy_reward`: is the response's final answer equal to the gold answer?

A response that opens `<think>` (itself or through the prefix) and never closes it scores 0.0 whatever number it
ends on (`require_closed_think=False` turns that off).

Pipeline per batch: extract the gold answer once per distinct solution and the predicted answer per response
(`extract.py`); decide what strings and exact numbers can decide (`numeric.py`, microseconds); send only the
rest, deduplicated, to math-verify with false-positive guards (`symbolic.py`) in time-bounded worker processes
(`verify_pool.py`). A gold answer that cannot be extracted gives None (TRL then ignores the row); a timed-out or
failed check gives 0.0 and is counted in `stats`.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from prefill_kit.errors import ConfigError
from prefill_kit.rewards.extract import extract_gold, extract_prediction
from prefill_kit.rewards.numeric import fast_equal
from prefill_kit.rewards.response import completion_text, gold_column, responses, unfinished_thinking
from prefill_kit.rewards.verify_pool import shared_pool

_WARM_MODULES = ("prefill_kit.rewards.symbolic:warm_up",)
_MAX_SYMBOLIC_CHARS = 1000  # longer "answers" are prose, not math: sympy on them only burns the time bound


@dataclass
class AccuracyStats:
    """Counters since creation (or `reset()`): how each item was decided."""

    items: int = 0
    gold_unparseable: int = 0
    no_prediction: int = 0
    fast_path: int = 0
    symbolic: int = 0
    timeouts: int = 0
    errors: int = 0

    def reset(self) -> None:
        for name in asdict(self):
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class AccuracyReward:
    """1.0 when the final answer of `prefix + completion` equals the gold answer from `solution` (or `answer`),
    0.0 when not (or when the check timed out, or the thinking never closed), None when the gold answer cannot be
    extracted."""

    __name__ = "accuracy_reward"

    def __init__(self, timeout: float = 5.0, num_workers: int | None = None, min_pool_batch: int = 8,
                 think_tag: str = "think", answer_tag: str = "answer", require_closed_think: bool = True) -> None:
        if timeout <= 0:
            raise ConfigError(f"accuracy: timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.num_workers = num_workers
        self.min_pool_batch = min_pool_batch
        self.think_tag = think_tag
        self.answer_tag = answer_tag
        self.require_closed_think = require_closed_think
        self.stats = AccuracyStats()
        self._stats_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for TRL's async rollout worker: the lock is per process.
        state = dict(self.__dict__)
        del state["_stats_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stats_lock = threading.Lock()

    def warm_up(self) -> None:
        """Start the verify workers now (a trainer calls this at setup; otherwise the first batch starts them)."""
        shared_pool(self.num_workers, _WARM_MODULES).start()

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        verdicts = self.correctness(completions, **kwargs)
        return [None if v is None else float(v) for v in verdicts]

    def correctness(self, completions: list[Any], **kwargs: Any) -> list[bool | None]:
        """Per completion: True/False, or None when its gold answer cannot be extracted."""
        n = len(completions)
        solutions = gold_column(kwargs, n, "accuracy")
        gold_cache: dict[str, str | None] = {}
        golds = []
        for solution in solutions:
            text = completion_text(solution)
            if text not in gold_cache:
                gold_cache[text] = extract_gold(text, self.answer_tag)
            golds.append(gold_cache[text])
        texts = responses(completions, **kwargs)
        preds = [None if self.require_closed_think and unfinished_thinking(r, self.think_tag)
                 else extract_prediction(r, self.answer_tag, self.think_tag) for r in texts]

        verdicts: list[bool | None] = [None] * n
        undecided: dict[tuple[str, str], list[int]] = {}
        counts = AccuracyStats(items=n)
        for i, (gold, pred) in enumerate(zip(golds, preds, strict=True)):
            if gold is None:
                counts.gold_unparseable += 1
                continue
            if pred is None:
                counts.no_prediction += 1
                verdicts[i] = False
                continue
            fast = fast_equal(gold, pred)
            if fast is not None:
                counts.fast_path += 1
                verdicts[i] = fast
            elif len(gold) > _MAX_SYMBOLIC_CHARS or len(pred) > _MAX_SYMBOLIC_CHARS:
                verdicts[i] = False
            else:
                undecided.setdefault((gold, pred), []).append(i)

        if undecided:
            self._check_symbolic(undecided, verdicts, counts)
        with self._stats_lock:
            for name, value in counts.as_dict().items():
                setattr(self.stats, name, getattr(self.stats, name) + value)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and counts.timeouts:
            try:
                log_metric("accuracy_reward/timeouts", float(counts.timeouts))
            except Exception:  # noqa: BLE001 - logging must never break the reward
                pass
        return verdicts

    def _check_symbolic(self, undecided: dict[tuple[str, str], list[int]], verdicts: list[bool | None],
                        counts: AccuracyStats) -> None:
        from prefill_kit.rewards.symbolic import symbolic_equal

        pairs = list(undecided)
        pool = shared_pool(self.num_workers, _WARM_MODULES)
        # Tiny batches do not fan out: one warm worker, still time-bounded.
        max_workers = 1 if len(pairs) < self.min_pool_batch else None
        results = pool.map(symbolic_equal, pairs, timeout=self.timeout, keys=[g for g, _ in pairs],
                           max_workers=max_workers)
        for pair, result in zip(pairs, results, strict=True):
            rows = undecided[pair]
            counts.symbolic += len(rows)
            if result.timed_out:
                counts.timeouts += len(rows)
            elif result.error is not None:
                counts.errors += len(rows)
            for i in rows:
                verdicts[i] = bool(result.value) if result.error is None and not result.timed_out else False


accuracy_reward = AccuracyReward()
