"""The closing lines both example jobs print: capture cost and how to open the dashboard."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from contrasim_monitor.result import CaptureResult


def tensorboard_command() -> str:
    """Return the ``tensorboard`` executable beside this Python, which is on PATH only in an active venv."""
    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.exists() else "tensorboard"


def print_run_summary(results: Sequence[CaptureResult], elapsed: float, log_dir: str) -> None:
    """Print the captures' steps and total time against the run's, then the command that opens the dashboard."""
    monitor_seconds = sum(sum(result.timings.values()) for result in results)
    print(
        f"{len(results)} captures at steps {[result.step for result in results]} took {monitor_seconds:.0f} s "
        f"of the {elapsed:.0f} s run."
    )
    print(f"Finished in {elapsed / 60:.1f} min. Open the dashboard with:")
    print(f"  {tensorboard_command()} --logdir {Path(log_dir).resolve()}")
