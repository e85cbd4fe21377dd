"""Model, data and recording shared by the two-process jobs and by the single-process replay in the tests.

The jobs run under ``torchrun --nproc_per_node 2``. Each rank records what its monitor saw: the rows of its
own share of the probe set, the gathered activations, and every similarity. Rank 0 also saves the model's
weights at each capture, so that the test can replay the captures in one process on identical weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import contrasim_monitor.monitor

# The shared tiny models live one folder up, in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import pad_collate, tiny_bert, token_dataset  # noqa: E402, F401 (the job scripts use them)

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.result import CaptureResult
from contrasim_monitor.tracker import SimilarityTracker

#: Odd, so that the two shares differ in size (34 and 33 rows).
PROBE_SIZE = 67
PROBE_BATCH_SIZE = 16
SCHEDULE = 2
MAX_STEPS = 4
EXPECTED_STEPS = [0, 2, 4]
FAST_CONTRASIM = ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5)


def probe_examples() -> list[dict]:
    return token_dataset(PROBE_SIZE, seed=2)


def check_world_size() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the initialised process group, and fail unless there are two processes."""
    assert dist.is_initialized(), "torch.distributed is not initialised; the job must run under torchrun"
    world_size = dist.get_world_size()
    assert world_size == 2, f"expected 2 processes, got world size {world_size}"
    return dist.get_rank(), world_size


class CaptureRecorder:
    """Record each capture's local rows, gathered activations and (on rank 0) the model's weights.

    It patches ``SimilarityTracker.update``, which receives the activations after the gather, and the monitor
    module's ``capture_activations``, which returns this process's share before the gather. Create it before the
    monitor, so that the initial capture is recorded too.
    """

    def __init__(self, model: torch.nn.Module, rank: int) -> None:
        self.model = model
        self.rank = rank
        self.local_rows: list[int] = []
        self.activations: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

        original_update = SimilarityTracker.update
        original_capture = contrasim_monitor.monitor.capture_activations

        def recording_update(tracker, step, activations, *args, **kwargs):
            self.activations[step] = {name: rows.detach().cpu().clone() for name, rows in activations.items()}
            if self.rank == 0:
                self.weights[step] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            return original_update(tracker, step, activations, *args, **kwargs)

        def recording_capture(*args, **kwargs):
            local = original_capture(*args, **kwargs)
            self.local_rows.append(len(next(iter(local.values()))))
            return local

        SimilarityTracker.update = recording_update
        contrasim_monitor.monitor.capture_activations = recording_capture

    def save(self, output_dir: Path, results: list[CaptureResult], world_size: int, extra: dict | None = None) -> None:
        """Write ``rank<r>.json`` and ``rank<r>_activations.pt`` (and ``weights.pt`` on rank 0) to ``output_dir``."""
        report = {
            "rank": self.rank,
            "world_size": world_size,
            "pid": os.getpid(),
            "steps": [result.step for result in results],
            "layers": results[0].layers if results else [],
            "local_rows": self.local_rows,
            "gathered_rows": {str(step): len(next(iter(acts.values()))) for step, acts in self.activations.items()},
            "results": [result.to_record() for result in results],
            **(extra or {}),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / f"rank{self.rank}.json").write_text(json.dumps(report))
        torch.save(self.activations, output_dir / f"rank{self.rank}_activations.pt")
        if self.rank == 0:
            torch.save(self.weights, output_dir / "weights.pt")
