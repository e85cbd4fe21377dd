"""A Trainer run whose disk fills up mid-run: ``python full_disk_job.py OUTPUT_DIR FULL_AT_STEP``.

At the end of optimizer step FULL_AT_STEP, the process's file size limit (RLIMIT_FSIZE) drops to one byte, so
every later write that would grow a file fails with EFBIG ("File too large"), as writes to a full disk fail with
ENOSPC. SIGXFSZ is ignored so that such a write raises OSError instead of killing the process. Pipes are not
files, so the report still reaches stdout as one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contrasim_monitor.integrations.transformers import ContraSimCallback  # noqa: E402
from tiny_models import pad_collate, tiny_bert, token_dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from contrasim_monitor.contrasim import ContraSimConfig  # noqa: E402

MAX_STEPS = 10


class FillDisk(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def main(output_dir: Path, full_at_step: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    monitor = ContraSimCallback(
        probe=token_dataset(64, seed=2),
        schedule=1,
        contrasim=ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=3),
        log_dir=output_dir / "tensorboard",
    )
    # FillDisk runs first, so the capture at the same step already meets the full disk.
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=token_dataset(256, seed=1),
        data_collator=pad_collate,
        callbacks=[FillDisk(full_at_step), monitor],
    )
    trainer.train()
    report = {
        "global_step": trainer.state.global_step,
        "monitor_enabled": monitor.monitor.enabled,
        "result_steps": [result.step for result in monitor.monitor.results],
        "log_dir": monitor.log_dir,
    }
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
