"""Two-process Trainer job with ContraSimCallback: ``torchrun --nproc_per_node 2 trainer_job.py OUTPUT_DIR``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import job_common
from contrasim_monitor.integrations.transformers import ContraSimCallback
from transformers import Trainer, TrainingArguments


def main(output_dir: Path) -> None:
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=job_common.MAX_STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
    )
    model = job_common.tiny_bert()
    callback = ContraSimCallback(
        probe=job_common.probe_examples(),
        schedule=job_common.SCHEDULE,
        log_dir=output_dir / "tb",
        contrasim=job_common.FAST_CONTRASIM,
        probe_batch_size=job_common.PROBE_BATCH_SIZE,
        data_collator=job_common.pad_collate,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=job_common.token_dataset(128, seed=1),
        data_collator=job_common.pad_collate,
        callbacks=[callback],
    )
    rank, world_size = job_common.check_world_size()
    assert trainer.args.world_size == 2, f"Trainer sees world size {trainer.args.world_size}"
    recorder = job_common.CaptureRecorder(model, rank)
    trainer.train()
    recorder.save(output_dir, callback.monitor.results, world_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
