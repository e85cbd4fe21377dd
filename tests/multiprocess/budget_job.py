"""Two processes whose budgets disagree, and ContraSim heads split between them.

``torchrun --nproc_per_node 2 budget_job.py OUTPUT_DIR``. Rank 0's budget clock runs fast, so it could always
afford a full capture; rank 1's clock does not move, so it can afford nothing. The monitors must agree on the
cheaper plan at every capture. Each rank also records which ContraSim heads it trained.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import job_common
import torch
import torch.distributed as dist

import contrasim_monitor.tracker
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.tracker import SimilarityTracker


class FastClock:
    """A clock that advances 1000 seconds per reading, so training time looks plentiful."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1000.0
        return self.now


def main(output_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = job_common.check_world_size()
    trained_heads: list[int] = []
    original_pairs = contrasim_monitor.tracker.contrasim_pairs

    def recording_pairs(features, pairs, *args, **kwargs):
        trained_heads.append(len(pairs))
        return original_pairs(features, pairs, *args, **kwargs)

    contrasim_monitor.tracker.contrasim_pairs = recording_pairs

    torch.manual_seed(0)
    model = job_common.tiny_bert()
    monitor = Monitor(SimilarityTracker(contrasim=job_common.FAST_CONTRASIM), budget=0.5)
    probe = ProbeSet(job_common.probe_examples(), job_common.pad_collate, job_common.PROBE_BATCH_SIZE)
    monitor.start(model, probe)
    monitor.budget.clock = FastClock() if rank == 0 else (lambda: 0.0)
    monitor.budget.start()
    # Both ranks see no cost of heads yet; give them a small one, so rank 0 plans a full capture.
    monitor.tracker.seconds_per_head = 1e-3

    planned = {}
    monitor.capture(model, 0, strict=True)
    for step, final in ((1, False), (2, True)):
        result = monitor.capture(model, step, final=final)
        planned[step] = None if result is None else sorted(result.cross_layer)

    # With the budget off, every head of a full capture is trained, split between the two processes.
    monitor.budget = None
    trained_heads.clear()
    fits = []
    original_fit = SimilarityTracker._fit_heads

    def recording_fit(tracker, features, pairs):
        scores = original_fit(tracker, features, pairs)
        fits.append((features, pairs, scores))
        return scores

    SimilarityTracker._fit_heads = recording_fit
    full = monitor.capture(model, 3)
    features, pairs, split_scores = fits[0]
    tracker = monitor.tracker
    # The same heads fitted in one call on this process alone, as a single-process run fits them.
    single_scores = original_pairs(
        features, pairs, tracker._train_index, tracker._test_index, config=tracker.contrasim_config
    )
    report = {
        "rank": rank,
        "world_size": world_size,
        "planned": {str(step): measures for step, measures in planned.items()},
        "steps": [result.step for result in monitor.results],
        "heads_trained_at_full_capture": trained_heads,
        "full_capture": full.to_record(),
        "heads_at_full_capture": len(pairs),
        "split_scores": split_scores.tolist(),
        "single_process_scores": single_scores.tolist(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
