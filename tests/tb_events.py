"""Read TensorBoard event files back the way the dashboard does."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_events(log_dir: str | Path, suffix: str = ".contrasim") -> EventAccumulator:
    """Load the single event file in ``log_dir`` whose name ends with ``suffix``."""
    files = sorted(Path(log_dir).glob(f"events.out.tfevents.*{suffix}"))
    assert len(files) == 1, f"expected one event file ending in {suffix} in {log_dir}, found {files}"
    accumulator = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator
