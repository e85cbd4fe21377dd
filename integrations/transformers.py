"""Hugging Face Trainer integration: ``ContraSimCallback``.

Example:
    >>> from contrasim_monitor.integrations.transformers import ContraSimCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
    ...                   callbacks=[ContraSimCallback(probe=512, schedule=50)])
    >>> trainer.train()
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.probe import ProbeSet, draw_examples
from contrasim_monitor.schedule import Schedule, resolve_schedule
from contrasim_monitor.tracker import MEASURES, SimilarityTracker

logger = logging.getLogger(__name__)

__all__ = ["ContraSimCallback"]


class ContraSimCallback(TrainerCallback):
    """Capture layer representations during ``Trainer.train()`` and log their similarities to TensorBoard.

    Captures happen at the start of training (the initial model), at every optimizer step that ``schedule``
    selects (``state.global_step``, so gradient accumulation does not shift them), and at the end of training.
    Each capture logs, per measure, the layer x layer similarity matrix of the current model and each layer's
    similarity to the initial and to the previous capture.

    Args:
        probe: The probe set: a number of examples to draw (seeded) from the Trainer's eval set (the train set
            when there is none), a dataset of tokenized examples, or a list of tokenized example dicts.
        schedule: A positive integer n (capture every n optimizer steps), a callable from step to bool, or None
            for log-spaced captures (about 4 per power of ten of the step count).
        layers: Module names or ``fnmatch`` patterns, or None for the embeddings output and every transformer
            block.
        log_dir: TensorBoard folder; by default the folder the Trainer's TensorBoard callback writes to.
        measures: Any of ``"contrasim"`` and ``"cka"``.
        pooling: ``"mean"`` over non-padding tokens, ``"first"`` token, or ``"last"`` non-padding token.
        contrasim: ContraSim hyperparameters; the published ones by default.
        held_out_fraction: Fraction of the probe set held out to score ContraSim heads.
        probe_batch_size: Examples per probe forward pass; ``per_device_eval_batch_size`` by default.
        seed: Seed for drawing the probe set and splitting it.
        data_collator: Collates probe examples into batches; by default the Trainer's training collator.

    Raises:
        ValueError, TypeError: On invalid arguments, when the callback is built. Layer names that match
            nothing and probe sets too small for the ContraSim split raise at the start of training.
    """

    def __init__(
        self,
        probe: int | Sequence[Any] | Any = 512,
        schedule: int | Schedule | None = None,
        layers: Sequence[str] | str | None = None,
        log_dir: str | os.PathLike | None = None,
        measures: Sequence[str] = MEASURES,
        pooling: str = "mean",
        contrasim: ContraSimConfig | None = None,
        held_out_fraction: float = 0.25,
        probe_batch_size: int | None = None,
        seed: int = 0,
        data_collator=None,
    ) -> None:
        if isinstance(probe, bool) or (isinstance(probe, int) and probe <= 0):
            raise ValueError(f"`probe` must be a positive number of examples or a dataset, got {probe!r}.")
        if not isinstance(probe, int) and not (hasattr(probe, "__len__") and hasattr(probe, "__getitem__")):
            raise TypeError(
                "`probe` must be a number of examples, a dataset, or a list of tokenized examples; got "
                f"{type(probe).__name__}."
            )
        if probe_batch_size is not None and (
            isinstance(probe_batch_size, bool) or not isinstance(probe_batch_size, int) or probe_batch_size <= 0
        ):
            raise ValueError(f"`probe_batch_size` must be a positive integer or None, got {probe_batch_size!r}.")
        self.schedule = resolve_schedule(schedule)
        self.tracker = SimilarityTracker(measures, contrasim, held_out_fraction, seed)
        if not isinstance(probe, int):
            self.tracker.check_probe_size(len(probe))
        self.monitor = Monitor(self.tracker, layers=layers, pooling=pooling)
        self.probe = probe
        self.log_dir = None if log_dir is None else str(log_dir)
        self.probe_batch_size = probe_batch_size
        self.seed = seed
        self.data_collator = data_collator
        self._train_start_time: float | None = None

    # Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._train_start_time = time.time()
        self.tracker.reset()
        self.monitor.results = []
        probe = self._build_probe(args, kwargs)
        log_dir = None
        if state.is_world_process_zero:
            log_dir = self.log_dir or self._trainer_log_dir(args)
            self.log_dir = log_dir
        self.monitor.start(model, probe, log_dir, is_main_process=state.is_world_process_zero)
        if state.global_step > 0:
            # NOTE: the captures of the run before the checkpoint are not restored, so "initial" means the
            # weights this run resumed from.
            logger.warning(
                "Training resumes at step %d: similarities 'vs_init' compare with the resumed weights at that step, "
                "not with the weights at step 0.",
                state.global_step,
            )
        # The initial capture is strict: a configuration that cannot capture stops the run before step 1.
        self.monitor.capture(model, state.global_step, strict=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.schedule(state.global_step) and self.monitor.last_step != state.global_step:
            self.monitor.capture(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        try:
            last_step = self.monitor.last_step
            if last_step is None or state.global_step > last_step:
                self.monitor.capture(model, state.global_step)
        finally:
            self.monitor.close()

    # Helpers

    def _build_probe(self, args, kwargs) -> ProbeSet:
        trainer = _calling_trainer()
        collate_fn = self.data_collator
        if collate_fn is None and trainer is not None:
            collate_fn = trainer.data_collator
        if collate_fn is None and kwargs.get("train_dataloader") is not None:
            collate_fn = kwargs["train_dataloader"].collate_fn
        batch_size = self.probe_batch_size or args.per_device_eval_batch_size

        if not isinstance(self.probe, int):
            examples = [self.probe[i] for i in range(len(self.probe))]
            return ProbeSet(examples, collate_fn=collate_fn, batch_size=batch_size)

        source = None
        if trainer is not None and trainer.eval_dataset is not None:
            source = trainer.eval_dataset
            if isinstance(source, dict):  # several named eval sets: draw from the first
                source = next(iter(source.values()))
        elif kwargs.get("eval_dataloader") is not None:
            source = kwargs["eval_dataloader"].dataset
        if source is None:
            if trainer is not None and trainer.train_dataset is not None:
                source = trainer.train_dataset
            elif kwargs.get("train_dataloader") is not None:
                source = kwargs["train_dataloader"].dataset
            if source is not None:
                logger.warning("The Trainer has no eval set, so the probe set is drawn from the training set.")
        if source is None or not hasattr(source, "__len__"):
            raise ValueError(
                f"`probe={self.probe}` asks to draw examples from the Trainer's eval set, but the Trainer has no "
                "eval or train dataset with a length. Pass the probe examples to ContraSimCallback(probe=...)."
            )
        examples = draw_examples(source, self.probe, self.seed)
        return ProbeSet(examples, collate_fn=collate_fn, batch_size=batch_size)

    def _trainer_log_dir(self, args) -> str:
        """Return the folder the Trainer's TensorBoard callback writes to, so the charts sit beside its losses.

        transformers 5 takes ``TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/runs/<time>_<host>``, the latter
        created by its TensorBoard callback at the start of training; transformers 4 has ``args.logging_dir``.
        """
        environment_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if environment_dir:
            return os.path.expanduser(environment_dir)
        logging_dir = getattr(args, "logging_dir", None)
        if logging_dir:
            return str(logging_dir)
        runs = Path(args.output_dir) / "runs"
        if runs.is_dir() and self._train_start_time is not None:
            # The TensorBoard callback runs its on_train_begin before this one and creates its folder then.
            recent = [
                path for path in runs.iterdir() if path.is_dir() and path.stat().st_mtime >= self._train_start_time - 5
            ]
            if recent:
                return str(max(recent, key=lambda path: path.stat().st_mtime))
        stamp = datetime.now().strftime("%b%d_%H-%M-%S")
        return str(runs / f"{stamp}_{socket.gethostname()}")


def _calling_trainer():
    """Find the Trainer whose event called this callback; callbacks are not handed the Trainer itself.

    The eval dataset and data collator are only reachable through it: at ``on_train_begin`` transformers passes
    the training dataloader but no eval dataloader.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None
