"""A calculator environment for `examples/grpo_tiny_tools.yaml`, in TRL's `environment_factory` conventions.

`rollout.environment: examples.calculator:Calculator` (importable from the repository root: prefill-kit puts the
working directory on the import path for `module:name` specs, as `python -m` does). One instance per rollout;
`reset(**row)` gets the data row; the public methods are the tools the model may call; `get_reward()` is an extra
reward named `Calculator`, weight 1.
"""

from __future__ import annotations


class Calculator:
    def __init__(self) -> None:
        self.solution: str | None = None
        self.results: list[float] = []

    def reset(self, **row) -> str | None:
        """Start a rollout on one data row; the returned text is appended to its last user message."""
        self.solution, self.results = row.get("solution"), []
        return " (You may call the calculator tools.)"

    def add(self, a: float, b: float) -> float:
        """Add two numbers.

        Args:
            a: The first number.
            b: The second number.
        """
        return self._keep(a + b)

    def multiply(self, a: float, b: float) -> float:
        """Multiply two numbers.

        Args:
            a: The first number.
            b: The second number.
        """
        return self._keep(a * b)

    def get_reward(self) -> float:
        """1.0 when some tool result equals the row's solution: the model computed the answer with the tools."""
        return 1.0 if any(_same(r, self.solution) for r in self.results) else 0.0

    def _keep(self, value: float) -> float:
        self.results.append(value)
        return value


def _same(value: float, solution: str | None) -> bool:
    try:
        return solution is not None and float(solution) == value
    except ValueError:
        return False
