"""The monitor on a model sharded with FSDP: ``torchrun --nproc_per_node 2 fsdp_job.py OUTPUT_DIR fsdp1|fsdp2``.

Under FSDP every forward pass gathers parameters from both processes, so both must run the same probe batches.
Each rank captures the initial sharded model, trains one step, and captures again. Before sharding, each rank
also captures an unsharded copy of the same weights without any collective call, as a reference.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import job_common
import torch
import torch.distributed as dist

from contrasim_monitor.capture import capture_activations, resolve_layers
from contrasim_monitor.measures import linear_cka_matrix
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.tracker import SimilarityTracker


def shard(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)


def main(output_dir: Path, kind: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = job_common.check_world_size()
    model = job_common.tiny_bert()
    probe = ProbeSet(job_common.probe_examples(), job_common.pad_collate, job_common.PROBE_BATCH_SIZE)

    unsharded = copy.deepcopy(model)
    reference = capture_activations(unsharded, probe.batches(), resolve_layers(unsharded))

    wrapped = shard(model, kind)
    monitor = Monitor(SimilarityTracker(contrasim=job_common.FAST_CONTRASIM))
    monitor.start(wrapped, probe)
    initial = monitor.capture(wrapped, 0, strict=True)
    tracker = monitor.tracker
    first_activations = {name: rows.clone() for name, rows in zip(tracker.layers, tracker.initial.tensors)}

    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    batch = job_common.pad_collate(job_common.token_dataset(8, seed=rank))
    wrapped(**batch).loss.backward()
    optimizer.step()
    after_step = monitor.capture(wrapped, 1)

    report = {
        "rank": rank,
        "world_size": world_size,
        "kind": kind,
        "wrapper": type(wrapped).__name__,
        "steps": [result.step for result in monitor.results],
        "rows": {name: len(rows) for name, rows in first_activations.items()},
        "max_difference_from_unsharded": max(
            float((first_activations[name] - reference[name]).abs().max()) for name in reference
        ),
        "unsharded_cka": linear_cka_matrix(list(reference.values())).tolist(),
        "initial": initial.to_record(),
        "after_step": None if after_step is None else after_step.to_record(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]), sys.argv[2])
