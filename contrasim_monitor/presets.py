"""Named presets that set how often the monitor captures, how large the probe set is and what it may cost.

A preset proposes capture steps with a schedule and, for the lighter presets, caps the monitor's wall time at a
fraction of the training run's (the budget). Under a budget, a scheduled capture that would overspend is taken
without ContraSim heads (closed-form measures only) or skipped; see :class:`~contrasim_monitor.monitor.Monitor`.

========= ===================== ============ =========================================================
preset    schedule              probe set    budget
========= ===================== ============ =========================================================
light     4 per decade of steps 256 examples 3% of training wall time (the default)
standard  4 per decade of steps 512 examples 10% of training wall time
thorough  8 per decade of steps 1024         none: every scheduled capture trains every ContraSim head
========= ===================== ============ =========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import LogSpaced, Schedule, resolve_schedule

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "resolve_preset", "validate_budget"]


@dataclass(frozen=True)
class Preset:
    """A named combination of capture schedule, probe set size and cost budget."""

    name: str
    schedule: Schedule
    probe_size: int
    budget: float | None


PRESETS: dict[str, Preset] = {
    "light": Preset("light", LogSpaced(per_decade=4), 256, 0.03),
    "standard": Preset("standard", LogSpaced(per_decade=4), 512, 0.10),
    "thorough": Preset("thorough", LogSpaced(per_decade=8), 1024, None),
}
DEFAULT_PRESET = "light"


def validate_budget(budget: float | None) -> float | None:
    """Check a budget: None, or the fraction of training wall time the monitor may spend, in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"`budget` must be None or a fraction of training time in (0, 1], got {budget!r}.")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"`budget` must be None or a fraction of training time in (0, 1], got {budget!r}.")
    return float(budget)


def resolve_preset(
    preset: str, schedule: int | Schedule | None, budget: float | str | None
) -> tuple[Preset, Schedule, float | None]:
    """Combine a preset with the user's own ``schedule`` and ``budget`` arguments.

    An explicit ``schedule`` replaces the preset's. ``budget="auto"`` takes the preset's budget when the
    schedule comes from the preset, and no budget when the user chose the schedule, so that every step the
    user's schedule selects is captured in full.

    Returns:
        The preset, the schedule to use and the budget to use (None for no budget).

    Raises:
        ValueError: For an unknown preset name or an invalid budget.
        TypeError: For a schedule that is neither an integer nor a callable.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}.")
    chosen = PRESETS[preset]
    resolved_schedule = resolve_schedule(schedule, default=chosen.schedule)
    if isinstance(budget, str):
        if budget != "auto":
            raise ValueError(f"`budget` must be 'auto', None or a fraction in (0, 1], got {budget!r}.")
        resolved_budget = chosen.budget if schedule is None else None
    else:
        resolved_budget = validate_budget(budget)
    return chosen, resolved_schedule, resolved_budget
