"""Wall-time accounting that keeps the monitor's cost under a fraction of the training run's."""

from __future__ import annotations

import time

__all__ = ["CaptureBudget", "CaptureLevel"]


class CaptureLevel:
    """How much of a capture to run, ordered so that the minimum over processes is one every process can afford."""

    SKIP = 0
    CLOSED_FORM = 1
    FULL = 2


class CaptureBudget:
    """Track the monitor's own wall time against the training time around it.

    Training time is the wall time since :meth:`start` minus the monitor's own. The monitor may spend
    ``fraction`` of the training time in all. A capture is planned at the highest level whose estimated cost
    fits in what is left, so the spend stays within the budget up to the error of the estimates. Two captures
    may overspend: the initial one, which every comparison needs, and a final one, taken at least with the
    closed-form measures.

    Args:
        fraction: Fraction of the training wall time the monitor may spend, in (0, 1].
        clock: Seconds as a float; ``time.perf_counter`` by default.
    """

    def __init__(self, fraction: float, clock=time.perf_counter) -> None:
        self.fraction = fraction
        self.clock = clock
        self.start()

    def start(self) -> None:
        """Restart the accounting, as at the beginning of a training run."""
        self._started = self.clock()
        self.spent = 0.0
        self.skipped_steps: list[int] = []
        self.closed_form_steps: list[int] = []

    @property
    def training_seconds(self) -> float:
        return max(self.clock() - self._started - self.spent, 0.0)

    @property
    def available(self) -> float:
        """Seconds the monitor may still spend now; negative after an overspend."""
        return self.fraction * self.training_seconds - self.spent

    def plan(self, closed_form_cost: float, full_cost: float, final: bool = False) -> int:
        """Return the :class:`CaptureLevel` whose estimated cost in seconds fits in what is available."""
        available = self.available
        if full_cost <= available:
            return CaptureLevel.FULL
        if closed_form_cost <= available or final:
            return CaptureLevel.CLOSED_FORM
        return CaptureLevel.SKIP

    def charge(self, seconds: float) -> None:
        self.spent += seconds
