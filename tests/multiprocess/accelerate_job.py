"""Two-process Accelerate loop with SimilarityMonitor: ``torchrun --nproc_per_node 2 accelerate_job.py OUTPUT_DIR``.

Gradient accumulation is 2, so the loop runs 2 micro-batches per optimizer step and ``MAX_STEPS`` optimizer steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import job_common
import torch
from accelerate import Accelerator
from contrasim_monitor.integrations.accelerate import SimilarityMonitor

TRACKER_RUN = "accelerate_run"


def main(output_dir: Path) -> None:
    accelerator = Accelerator(
        cpu=True, log_with="tensorboard", project_dir=str(output_dir / "tracker"), gradient_accumulation_steps=2
    )
    accelerator.init_trackers(TRACKER_RUN)
    rank, world_size = job_common.check_world_size()
    assert accelerator.num_processes == 2, f"Accelerator sees {accelerator.num_processes} processes"

    model = job_common.tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        job_common.token_dataset(128, seed=1), batch_size=4, shuffle=False, collate_fn=job_common.pad_collate
    )
    prepared_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    recorder = job_common.CaptureRecorder(model, rank)
    monitor = SimilarityMonitor(
        accelerator,
        prepared_model,
        job_common.probe_examples(),
        schedule=job_common.SCHEDULE,
        contrasim=job_common.FAST_CONTRASIM,
        probe_batch_size=job_common.PROBE_BATCH_SIZE,
        collate_fn=job_common.pad_collate,
    )

    optimizer_steps = 0
    with monitor:
        for batch in loader:
            with accelerator.accumulate(prepared_model):
                accelerator.backward(prepared_model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
            monitor.step()
            if accelerator.sync_gradients:
                optimizer_steps += 1
                if optimizer_steps == job_common.MAX_STEPS:
                    break
    recorder.save(output_dir, monitor.results, world_size, extra={"log_dir": monitor.log_dir})
    # Closes the TensorBoard writer and, in accelerate 1.16, destroys the process group.
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
