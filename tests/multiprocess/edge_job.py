"""Two processes in edge cases: ``torchrun --nproc_per_node 2 edge_job.py OUTPUT_DIR``.

1. The ranks build different probe sets: both must raise a clear error at start instead of failing in gloo.
2. Two layers give one ContraSim head, fewer than the processes: both ranks train it and agree.
3. Every output of rank 0 fails: both ranks must stop monitoring, so neither waits alone in a collective.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import job_common
import torch.distributed as dist

from contrasim_monitor.monitor import Monitor
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.tracker import SimilarityTracker


class FailingSink:
    def write(self, result) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def new_monitor(layers=None) -> Monitor:
    return Monitor(SimilarityTracker(contrasim=job_common.FAST_CONTRASIM), layers=layers)


def main(output_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = job_common.check_world_size()
    model = job_common.tiny_bert()
    examples = job_common.probe_examples()
    report: dict = {"rank": rank, "world_size": world_size}

    different = ProbeSet(examples[: len(examples) - rank], job_common.pad_collate, job_common.PROBE_BATCH_SIZE)
    try:
        new_monitor().start(model, different)
        report["different_probe_error"] = None
    except ValueError as error:
        report["different_probe_error"] = str(error)

    probe = ProbeSet(examples, job_common.pad_collate, job_common.PROBE_BATCH_SIZE)
    two_layers = new_monitor(layers=["bert.encoder.layer.0", "bert.encoder.layer.1"])
    two_layers.start(model, probe)
    two_layers.capture(model, 0, strict=True)
    report["one_head_scores"] = two_layers.results[0].to_record()["cross_layer"]["contrasim"]

    failing = new_monitor()
    failing.start(model, probe, sinks=[FailingSink()] if rank == 0 else None, is_main_process=rank == 0)
    failing.capture(model, 0, strict=True)
    report["after_failure"] = [failing.capture(model, step) is not None for step in (1, 2)]
    report["enabled"] = failing.enabled

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
