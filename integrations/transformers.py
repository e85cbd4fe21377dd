"""Hugging Face Trainer integration: ``ContraSimCallback``.

Example:
    >>> from contrasim_monitor.integrations.transformers import ContraSimCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
    ...                   callbacks=[ContraSimCallback(probe=512, schedule=50)])
    >>> trainer.train()
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.presets import DEFAULT_PRESET, resolve_preset
from contrasim_monitor.probe import ProbeSet, draw_examples
from contrasim_monitor.schedule import Schedule
from contrasim_monitor.tracker import MEASURES, SimilarityTracker

logger = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "ContraSimCallback"]

#: File in each Trainer checkpoint folder that records where the monitor's store and TensorBoard folder are.
STATE_FILE = "contrasim_monitor.json"


class ContraSimCallback(TrainerCallback):
    """Capture layer representations during ``Trainer.train()`` and log their similarities to TensorBoard.

    Captures happen at the start of training (the initial model), at every optimizer step that ``schedule``
    selects (``state.global_step``, so gradient accumulation does not shift them), and at the end of training.
    Each capture logs, per measure, the layer x layer similarity matrix of the current model and each layer's
    similarity to the initial and to the previous capture.

    Args:
        probe: The probe set: a number of examples to draw (seeded) from the Trainer's eval set (the train set
            when there is none), a dataset of tokenized examples, or a list of tokenized example dicts. None
            draws the preset's number of examples.
        schedule: A positive integer n (capture every n optimizer steps), a callable from step to bool, or None
            for the preset's log-spaced schedule.
        preset: ``"light"`` (256 probe examples, monitor time capped at 3% of training time), ``"standard"``
            (512, 10%) or ``"thorough"`` (1024, no cap, twice as many captures); see
            :mod:`contrasim_monitor.presets`.
        budget: Fraction of the training wall time the monitor may spend, None for no cap, or ``"auto"``: the
            preset's cap when ``schedule`` is None, and no cap when you pass a schedule. Under a cap, a
            scheduled capture that would overspend is taken without ContraSim heads or skipped.
        layers: Module names or glob patterns (``*`` matches within one dotted part, ``**`` across parts), or
            None for the embeddings output and every transformer block.
        log_dir: TensorBoard folder; by default the folder the Trainer's TensorBoard callback writes to.
        measures: Any of ``"contrasim"`` and ``"cka"``.
        pooling: ``"mean"`` over non-padding tokens, ``"first"`` token, ``"last"`` non-padding token, or
            ``"sample"``: ``tokens_per_example`` seeded token positions per example, each compared as a row.
        tokens_per_example: Token positions drawn per example with ``pooling="sample"``.
        contrasim: ContraSim hyperparameters; the published ones by default.
        held_out_fraction: Fraction of the probe set held out to score ContraSim heads.
        probe_batch_size: Examples per probe forward pass; ``per_device_eval_batch_size`` by default.
        seed: Seed for drawing the probe set and splitting it.
        data_collator: Collates probe examples into batches; by default the Trainer's training collator.
        store_dir: Folder of the snapshot store that keeps each capture's activations for later comparison and
            for resuming; ``<log_dir>/snapshots`` by default, False for none.
        snapshot_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for stored activations.
        max_snapshots: Snapshots kept in the store; the first and newest always stay and the rest are thinned
            evenly over the steps. None keeps all.

    A run resumed from a Trainer checkpoint continues the same series. Each checkpoint folder records where the
    store and the TensorBoard folder are (``contrasim_monitor.json``). On resume, the store's captures up to the
    resumed step become the initial and previous captures, and later ones from the abandoned continuation are
    dropped.

    Raises:
        ValueError, TypeError: On invalid arguments, when the callback is built. Layer names that match
            nothing and probe sets too small for the ContraSim split raise at the start of training.
    """

    def __init__(
        self,
        probe: int | Sequence[Any] | Any | None = None,
        schedule: int | Schedule | None = None,
        layers: Sequence[str] | str | None = None,
        log_dir: str | os.PathLike | None = None,
        measures: Sequence[str] = MEASURES,
        pooling: str = "mean",
        tokens_per_example: int = 8,
        contrasim: ContraSimConfig | None = None,
        held_out_fraction: float = 0.25,
        probe_batch_size: int | None = None,
        seed: int = 0,
        data_collator=None,
        store_dir: str | os.PathLike | bool | None = None,
        snapshot_dtype: str = "float16",
        max_snapshots: int | None = 64,
        preset: str = DEFAULT_PRESET,
        budget: float | str | None = "auto",
    ) -> None:
        chosen, self.schedule, budget = resolve_preset(preset, schedule, budget)
        self._probe_from_preset = probe is None
        if probe is None:
            probe = chosen.probe_size
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
        if store_dir is not None and not isinstance(store_dir, (str, os.PathLike, bool)) or store_dir is True:
            raise TypeError(f"`store_dir` must be a folder path, None for the default, or False, got {store_dir!r}.")
        _validate_store_arguments(snapshot_dtype, max_snapshots)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"`seed` must be an integer in [0, 2**32), got {seed!r}.")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a folder path or None, got {type(log_dir).__name__} {log_dir!r}.")

        self.tracker = SimilarityTracker(measures, contrasim, held_out_fraction, seed)
        if not isinstance(probe, int):
            self.tracker.check_probe_size(len(probe))
        self.monitor = Monitor(
            self.tracker,
            layers=layers,
            pooling=pooling,
            tokens_per_example=tokens_per_example,
            seed=seed,
            budget=budget,
        )

        self.probe = probe
        self._log_dir_argument = None if log_dir is None else str(log_dir)
        #: The TensorBoard folder of the current or last run, known once training starts.
        self.log_dir: str | None = None
        self.probe_batch_size = probe_batch_size
        self.seed = seed
        self.data_collator = data_collator
        # The store itself is opened at the start of training, when its folder is known.
        self.store_dir = store_dir
        self.snapshot_dtype = snapshot_dtype
        self.max_snapshots = max_snapshots
        self._active_store_dir: str | None = None
        self._schedule_failed = False

    # Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tracker.reset()
        self._schedule_failed = False
        trainer, checkpoint_dir = _calling_trainer()
        probe = self._build_probe(args, kwargs, trainer)

        resume_step = state.global_step if state.global_step > 0 else None
        saved = _read_saved_state(checkpoint_dir, args.output_dir, resume_step) if resume_step else {}
        is_main = state.is_world_process_zero
        log_dir = None
        writer = None
        if is_main:
            trainer_writer = _trainer_tensorboard_writer(trainer)
            log_dir = self._log_dir_argument or saved.get("log_dir")
            if log_dir is None and trainer_writer is not None:
                # Write through the Trainer's own writer: one event file, read correctly by every TensorBoard loader.
                writer = trainer_writer
                log_dir = writer.log_dir
            elif log_dir is None:
                log_dir = self._new_log_dir(args)
            self.log_dir = str(log_dir)
        store = self._open_store(saved, self.log_dir if is_main else None, is_main, resume_step)
        self.monitor.start(
            model,
            probe,
            self.log_dir if is_main else None,
            is_main_process=is_main,
            store=store,
            resume_step=resume_step,
            writer=writer,
        )
        if resume_step is not None and self.monitor.last_step is None:
            # NOTE: no stored captures to continue from, so "initial" means the weights this run resumed from.
            logger.warning(
                "Training resumes at step %d without stored captures of the earlier run: similarities 'vs_init' "
                "compare with the resumed weights at that step, not with the weights at step 0.",
                resume_step,
            )
        if self.monitor.last_step != state.global_step:
            # Strict: a configuration that cannot capture stops the run before its first step.
            try:
                self.monitor.capture(model, state.global_step, strict=True)
            except Exception:
                self.monitor.close()
                raise

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            return
        saved = {"step": state.global_step, "log_dir": self.log_dir, "store_dir": self._active_store_dir}
        try:
            (checkpoint / STATE_FILE).write_text(json.dumps(saved, indent=2), encoding="utf-8")
        except OSError as error:
            logger.error(
                "Could not save the monitor state into %s (%s); a resumed run starts a new series.", checkpoint, error
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.monitor.last_step == step:
            return
        # The last step is captured here, before the Trainer may reload the best checkpoint at the end.
        last = step >= state.max_steps > 0 or control.should_training_stop
        if last or self._scheduled(step):
            self.monitor.capture(model, step, final=last)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        try:
            last_step = self.monitor.last_step
            if last_step is not None and state.global_step > last_step:
                if args.load_best_model_at_end:
                    logger.warning(
                        "No final capture at step %d: the Trainer has reloaded the best checkpoint, so the model no "
                        "longer holds the weights of that step.",
                        state.global_step,
                    )
                else:
                    self.monitor.capture(model, state.global_step, final=True)
        finally:
            self.monitor.close()

    def _scheduled(self, step: int) -> bool:
        """Call the user's schedule; a schedule that raises is reported once and then treated as False."""
        if self._schedule_failed:
            return False
        try:
            return bool(self.schedule(step))
        except Exception:
            self._schedule_failed = True
            logger.exception(
                "The capture schedule raised at step %d; scheduled captures stop, training continues.", step
            )
            return False

    # Helpers

    def _open_store(self, saved: dict, log_dir: str | None, is_main: bool, resume_step: int | None):
        """Open the snapshot store; the main process creates it, the others open it only to resume."""
        store_dir = None
        if self.store_dir is not False:
            if self.store_dir is not None:
                store_dir = str(self.store_dir)
            elif saved.get("store_dir"):
                store_dir = saved["store_dir"]
            elif log_dir is not None:
                # Inside the run's TensorBoard folder, which is new for each run unless set explicitly.
                store_dir = str(Path(log_dir) / "snapshots")
        self._active_store_dir = store_dir
        if store_dir is None:
            return None

        from contrasim_monitor.store import SnapshotStore

        if not is_main:
            exists = (Path(store_dir) / "index.json").exists()
            return SnapshotStore.open(store_dir) if resume_step is not None and exists else None
        try:
            store = SnapshotStore(store_dir, self.snapshot_dtype, max_snapshots=self.max_snapshots)
        except OSError as error:
            # An unwritable folder or a full disk must not stop training: the other outputs still work.
            logger.error(
                "Cannot create the snapshot store in %s (%s); captures are not stored. Pass a writable store_dir= "
                "or store_dir=False.",
                store_dir,
                error,
            )
            self._active_store_dir = None
            return None
        if resume_step is None and store.steps():
            raise ValueError(
                f"The snapshot store {store_dir} already holds captures at steps {store.steps()[:5]} of another run. "
                "Resume that run from its checkpoint, pass another `store_dir=` (or `log_dir=`), or delete the folder."
            )
        return store

    def _build_probe(self, args, kwargs, trainer) -> ProbeSet:
        collate_fn = self.data_collator
        if collate_fn is None and trainer is not None:
            collate_fn = trainer.data_collator
        if collate_fn is None and kwargs.get("train_dataloader") is not None:
            collate_fn = kwargs["train_dataloader"].collate_fn
        batch_size = self.probe_batch_size or args.per_device_eval_batch_size
        if type(collate_fn).__name__ == "DataCollatorForLanguageModeling" and getattr(collate_fn, "mlm", False):
            # Masking the probe would change its tokens; pad it instead.
            from transformers import DataCollatorWithPadding

            collate_fn = DataCollatorWithPadding(collate_fn.tokenizer)

        if not isinstance(self.probe, int):
            examples = [self.probe[i] for i in range(len(self.probe))]
            return ProbeSet(examples, collate_fn=collate_fn, batch_size=batch_size)

        source = None
        if trainer is not None and trainer.eval_dataset is not None:
            source = trainer.eval_dataset
            if isinstance(source, dict):  # several named eval sets: draw from the first
                name, source = next(iter(source.items()))
                logger.info(
                    "The probe set is drawn from the eval set %r, the first of %d.", name, len(trainer.eval_dataset)
                )
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
        try:
            examples = draw_examples(source, self.probe, self.seed)
        except ValueError as error:
            if not self._probe_from_preset:
                raise
            raise ValueError(
                f"{error} The probe size {self.probe} comes from the preset; pass probe=<a smaller number>."
            ) from error
        return ProbeSet(examples, collate_fn=collate_fn, batch_size=batch_size)

    def _new_log_dir(self, args) -> str:
        """Return a new run folder where the Trainer would put one: ``TENSORBOARD_LOGGING_DIR``, ``logging_dir``
        (transformers 4), or ``<output_dir>/runs/<time>_<host>`` (transformers 5)."""
        environment_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if environment_dir:
            return os.path.expanduser(environment_dir)
        logging_dir = getattr(args, "logging_dir", None)
        if logging_dir:
            return str(logging_dir)
        stamp = datetime.now().strftime("%b%d_%H-%M-%S")
        return str(Path(args.output_dir) / "runs" / f"{stamp}_{socket.gethostname()}")


def _calling_trainer():
    """Find the Trainer whose event called this callback, and the checkpoint its ``train()`` resumes from.

    Callbacks are not handed the Trainer itself. The eval dataset and data collator are only reachable through
    it, because at ``on_train_begin`` transformers passes the training dataloader but no eval dataloader.

    Returns:
        ``(trainer, resume_from_checkpoint)``, each None when not found.
    """
    from transformers import Trainer

    trainer = None
    checkpoint = None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            trainer = candidate
            value = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(value, (str, os.PathLike)):
                checkpoint = str(value)
        frame = frame.f_back
    return trainer, checkpoint


def _trainer_tensorboard_writer(trainer):
    """Return the SummaryWriter of the Trainer's TensorBoard callback, or None when it has none."""
    if trainer is None:
        return None
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
            return callback.tb_writer
    return None


def _read_saved_state(checkpoint_dir: str | None, output_dir: str, step: int) -> dict:
    """Read the monitor state saved in the checkpoint a run resumes from; empty when there is none."""
    candidates = [Path(checkpoint_dir)] if checkpoint_dir else []
    candidates.append(Path(output_dir) / f"checkpoint-{step}")
    for folder in candidates:
        path = folder / STATE_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                logger.error("Could not read the monitor state %s (%s); starting a new series.", path, error)
    return {}


def _validate_store_arguments(snapshot_dtype: str, max_snapshots: int | None) -> None:
    if snapshot_dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"`snapshot_dtype` must be 'float16', 'bfloat16' or 'float32', got {snapshot_dtype!r}.")
    if max_snapshots is not None and (
        isinstance(max_snapshots, bool) or not isinstance(max_snapshots, int) or max_snapshots < 2
    ):
        raise ValueError(f"`max_snapshots` must be an integer of at least 2 or None, got {max_snapshots!r}.")
