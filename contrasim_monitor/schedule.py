"""Capture schedules: callables from an optimizer step to a bool.

Schedules are keyed on the optimizer step (``TrainerState.global_step`` under the Hugging Face Trainer), so
gradient accumulation does not change when captures happen.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["EveryNSteps", "LogSpaced", "Schedule", "resolve_schedule"]

Schedule = Callable[[int], bool]


class EveryNSteps:
    """Capture at every ``n``-th optimizer step (steps n, 2n, 3n, ...).

    Args:
        n: Interval in optimizer steps, a positive integer.
    """

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"EveryNSteps: `n` must be a positive integer, got {n!r}.")
        self.n = n

    def __call__(self, step: int) -> bool:
        return step > 0 and step % self.n == 0

    def __repr__(self) -> str:
        return f"EveryNSteps({self.n})"


class LogSpaced:
    """Capture densely early and sparsely late: about ``per_decade`` steps in each power of ten.

    The steps are the distinct values of ``round(10 ** (k / per_decade))`` for k = 0, 1, 2, ..., so with the
    default of 4 per decade: 1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000, ...

    Args:
        per_decade: Number of captures per factor of ten in the step count, a positive integer.
        max_interval: If given, also capture every ``max_interval`` steps, so that long runs keep a floor on
            the capture rate.
    """

    def __init__(self, per_decade: int = 4, max_interval: int | None = None) -> None:
        if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade <= 0:
            raise ValueError(f"LogSpaced: `per_decade` must be a positive integer, got {per_decade!r}.")
        if max_interval is not None and (
            isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval <= 0
        ):
            raise ValueError(f"LogSpaced: `max_interval` must be a positive integer or None, got {max_interval!r}.")
        self.per_decade = per_decade
        self.max_interval = max_interval

    def __call__(self, step: int) -> bool:
        if step <= 0:
            return False
        if self.max_interval is not None and step % self.max_interval == 0:
            return True
        # Only the exponents next to log10(step) can round to `step`.
        k_center = round(math.log10(step) * self.per_decade)
        return any(round(10 ** (k / self.per_decade)) == step for k in (k_center - 1, k_center, k_center + 1) if k >= 0)

    def __repr__(self) -> str:
        return f"LogSpaced(per_decade={self.per_decade}, max_interval={self.max_interval})"


def resolve_schedule(schedule: int | Schedule | None, default: Schedule | None = None) -> Schedule:
    """Turn the user's ``schedule=`` argument into a callable.

    Args:
        schedule: A positive integer n (capture every n optimizer steps), a callable from step to bool, or None
            for ``default``.
        default: The schedule used when ``schedule`` is None; ``LogSpaced()`` if not given.

    Raises:
        ValueError: For an integer that is not positive.
        TypeError: For anything that is neither an integer nor a callable.
    """
    if schedule is None:
        return default if default is not None else LogSpaced()
    if isinstance(schedule, bool):
        raise TypeError(f"`schedule` must be a positive integer or a callable from step to bool, got {schedule!r}.")
    if isinstance(schedule, int):
        if schedule <= 0:
            raise ValueError(f"`schedule` must be a positive integer number of optimizer steps, got {schedule}.")
        return EveryNSteps(schedule)
    if callable(schedule):
        return schedule
    raise TypeError(
        f"`schedule` must be a positive integer or a callable from step to bool, got {type(schedule).__name__} "
        f"{schedule!r}."
    )
