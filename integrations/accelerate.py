"""Accelerate integration: ``SimilarityMonitor`` for custom training loops.

Example:
    >>> accelerator = Accelerator(log_with="tensorboard", project_dir="runs", gradient_accumulation_steps=4)
    >>> accelerator.init_trackers("my_run")
    >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    >>> with SimilarityMonitor(accelerator, model, probe_examples, schedule=50) as monitor:  # captures step 0
    ...     for batch in loader:
    ...         with accelerator.accumulate(model):
    ...             accelerator.backward(model(**batch).loss)
    ...             optimizer.step()
    ...             optimizer.zero_grad()
    ...         monitor.step()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from contrasim_monitor.capture import resolve_layers
from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.distributed import all_succeeded
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.presets import DEFAULT_PRESET, resolve_preset
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.result import CaptureResult
from contrasim_monitor.schedule import Schedule
from contrasim_monitor.sinks import JsonLinesSink, TensorBoardSink, scalar_tags
from contrasim_monitor.tracker import MEASURES, SimilarityTracker

logger = logging.getLogger(__name__)

__all__ = ["SimilarityMonitor"]

DEFAULT_PROBE_BATCH_SIZE = 32


class SimilarityMonitor:
    """Capture layer representations in an Accelerate training loop and log their similarities.

    The initial capture (step 0) runs inside the constructor, so build the monitor after
    ``accelerator.init_trackers(...)`` and before the first optimizer step. It is strict: layer names that match
    nothing, a probe set too small for the ContraSim split or layers whose hooks never run raise there, before
    training starts. Later captures log their errors and training goes on; monitoring switches itself off after
    three failed captures in a row.

    Call :meth:`step` once per loop iteration, after the optimizer step, on every process: the probe set is
    split over the processes and the captures use collectives. An iteration counts as an optimizer step only
    when ``accelerator.sync_gradients`` is True, so gradient accumulation does not shift captures. Steps that
    mixed precision skips after a gradient overflow still count, as in the Hugging Face Trainer.
    :meth:`finish` (or leaving a ``with`` block without an exception) takes the final capture unless the last
    optimizer step was already captured, then closes the sinks.

    Only the main process writes. The per-layer scalars go to every tracker through ``accelerator.log``. The
    heatmaps and the text summary go through the TensorBoard tracker's ``SummaryWriter`` when that tracker is
    in use, and into a new event file in ``log_dir`` otherwise (scalars included then). Each capture is also
    appended to ``contrasim.jsonl`` in ``log_dir``, or in the TensorBoard tracker's folder when ``log_dir`` is
    None. Forward hooks exist only during a capture.

    Args:
        accelerator: The run's Accelerator.
        model: The model being trained, prepared by ``accelerator.prepare`` or not. Its wrappers are removed for
            the probe forward pass.
        probe: Probe examples: a list of tokenized example dicts, an indexable dataset of them, or a
            :class:`~contrasim_monitor.probe.ProbeSet`. Label keys are dropped.
        schedule: A positive integer n (capture every n optimizer steps), a callable from optimizer step to
            bool, or None for the preset's log-spaced schedule.
        layers: Module names or glob patterns, or None for the embeddings output and every transformer block.
        measures: Any of ``"contrasim"`` and ``"cka"``.
        pooling: ``"mean"`` over non-padding tokens, ``"first"`` token, or ``"last"`` non-padding token.
        contrasim: ContraSim hyperparameters; the published ones by default.
        held_out_fraction: Fraction of the probe set held out to score ContraSim heads.
        probe_batch_size: Examples per probe forward pass (32 by default). Not allowed with a ProbeSet, which has
            its own batch size.
        seed: Seed of the ContraSim train/held-out split of the probe set.
        collate_fn: Collates a list of probe examples into a batch dict; by default sequence fields are
            right-padded with 0 and ``attention_mask`` marks the padding. Not allowed with a ProbeSet.
        preset: ``"light"`` (monitor time capped at 3% of training time), ``"standard"`` (10%) or
            ``"thorough"`` (no cap, twice as many captures); see :mod:`contrasim_monitor.presets`. The probe set is
            always the one given.
        budget: Fraction of the training wall time the monitor may spend, None for no cap, or ``"auto"``: the
            preset's cap when ``schedule`` is None, and no cap when you pass a schedule. Under a cap, a
            scheduled capture that would overspend is taken without ContraSim heads or skipped.
        log_dir: Folder for ``contrasim.jsonl``, and for a TensorBoard event file when no TensorBoard tracker is
            in use. None writes into the TensorBoard tracker's folder, or writes no files without that tracker.

    Raises:
        TypeError, ValueError: On invalid arguments, and on any error of the initial capture.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        probe: Sequence[Mapping[str, Any]] | ProbeSet | Any,
        schedule: int | Schedule | None = None,
        layers: Sequence[str] | str | None = None,
        measures: Sequence[str] = MEASURES,
        pooling: str = "mean",
        contrasim: ContraSimConfig | None = None,
        held_out_fraction: float = 0.25,
        probe_batch_size: int | None = None,
        seed: int = 0,
        collate_fn: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None = None,
        log_dir: str | os.PathLike | None = None,
        preset: str = DEFAULT_PRESET,
        budget: float | str | None = "auto",
    ) -> None:
        if not isinstance(accelerator, Accelerator):
            raise TypeError(f"`accelerator` must be an accelerate.Accelerator, got {type(accelerator).__name__}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an integer, got {type(seed).__name__} {seed!r}.")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a folder path or None, got {type(log_dir).__name__} {log_dir!r}.")
        _, self.schedule, budget = resolve_preset(preset, schedule, budget)
        self.tracker = SimilarityTracker(measures, contrasim, held_out_fraction, seed)
        probe_set = _build_probe(probe, probe_batch_size, collate_fn)
        self.tracker.check_probe_size(len(probe_set))
        self.monitor = Monitor(self.tracker, layers=layers, pooling=pooling, budget=budget)
        # Layer names that match nothing raise here too, before the main process creates any file.
        resolve_layers(model, self.monitor.layer_patterns)

        self.accelerator = accelerator
        # The prepared model, wrappers included: the monitor unwraps it for the probe fields and the hooks, and
        # keeps an FSDP wrapper for the forward pass, because that wrapper gathers the sharded parameters.
        self.model = model
        self.optimizer_step = 0
        self.log_dir: str | None = None
        self._closed = False

        sinks: list = []
        error: Exception | None = None
        if accelerator.is_main_process:
            try:
                sinks = self._open_sinks(log_dir)
            except Exception as caught:
                error = caught
        # Collective: only the main process opens sinks, and every process must stop if that failed.
        if not all_succeeded(error is None):
            if error is not None:
                raise error
            raise RuntimeError(
                "SimilarityMonitor failed to open its sinks on the main process. See that process's error."
            )
        try:
            self.monitor.start(self.model, probe_set, is_main_process=accelerator.is_main_process, sinks=sinks)
            self.monitor.capture(self.model, 0, strict=True)
        except BaseException:
            for sink in sinks:
                sink.close()
            self._closed = True
            raise

    @property
    def results(self) -> list[CaptureResult]:
        """The results of every successful capture so far, in step order (the same on every process)."""
        return self.monitor.results

    @property
    def last_capture_step(self) -> int | None:
        """The optimizer step of the latest successful capture, or None when none succeeded."""
        return self.monitor.last_step

    def step(self) -> CaptureResult | None:
        """Count an optimizer step if ``accelerator.sync_gradients`` is True, and capture if the schedule selects it.

        Call it on every process once per loop iteration, after the optimizer step (outside or at the end of
        ``accelerator.accumulate``).

        Returns:
            The capture's result, or None when this iteration did not capture or the capture failed.
        """
        if self._closed:
            raise RuntimeError("SimilarityMonitor.step() called after finish() or close(), so the monitor is closed.")
        if not self.accelerator.sync_gradients:
            return None
        self.optimizer_step += 1
        if not self.schedule(self.optimizer_step) or self.monitor.last_step == self.optimizer_step:
            return None
        return self.monitor.capture(self.model, self.optimizer_step)

    def finish(self) -> CaptureResult | None:
        """Take the final capture unless the last optimizer step was captured, then close the sinks.

        Call it on every process. Calling it again does nothing.

        Returns:
            The final capture's result, or None when no final capture was needed or it failed.
        """
        if self._closed:
            return None
        try:
            last_step = self.monitor.last_step
            if last_step is None or self.optimizer_step > last_step:
                return self.monitor.capture(self.model, self.optimizer_step, final=True)
            return None
        finally:
            self.close()

    def close(self) -> None:
        """Close the sinks without a final capture. The TensorBoard tracker's writer is flushed, not closed."""
        if not self._closed:
            self.monitor.close()
            self._closed = True

    def __enter__(self) -> SimilarityMonitor:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        # After an exception the other processes may not reach the final capture's collectives, so only close.
        if exc_type is None:
            self.finish()
        else:
            self.close()

    def _open_sinks(self, log_dir: str | os.PathLike | None) -> list:
        """Build the main process's sinks from the Accelerator's trackers and ``log_dir``.

        Accelerate starts trackers on the main process only, so this must not run on the others.
        """
        if self.accelerator.log_with and not self.accelerator.trackers:
            raise RuntimeError(
                f"The Accelerator logs with {[str(t) for t in self.accelerator.log_with]}, but its trackers are not "
                "started yet. Call accelerator.init_trackers(...) before building SimilarityMonitor, so that the "
                "similarities reach those trackers."
            )
        measures = self.tracker.measures
        sinks: list = []
        if self.accelerator.trackers:
            sinks.append(_AcceleratorLogSink(self.accelerator))
        writer = None
        if any(tracker.name == "tensorboard" for tracker in self.accelerator.trackers):
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            sinks.append(TensorBoardSink(None, measures, writer=writer, write_scalars=False))
        elif log_dir is not None:
            sinks.append(TensorBoardSink(log_dir, measures))

        if log_dir is None and writer is not None:
            log_dir = writer.get_logdir()
        if log_dir is None:
            logger.warning(
                "SimilarityMonitor writes no files: the Accelerator has no TensorBoard tracker and `log_dir` is None. "
                "The results stay in `monitor.results`%s.",
                " and the scalars go to the trackers" if self.accelerator.trackers else "",
            )
        else:
            self.log_dir = str(log_dir)
            sinks.append(JsonLinesSink(Path(log_dir) / "contrasim.jsonl"))
        return sinks


class _AcceleratorLogSink:
    """Send each capture's per-layer scalars to every tracker with ``accelerator.log``, at the capture's step."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def write(self, result: CaptureResult) -> None:
        self.accelerator.log(scalar_tags(result), step=result.step)

    def close(self) -> None:
        pass


def _build_probe(
    probe: Any,
    batch_size: int | None,
    collate_fn: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None,
) -> ProbeSet:
    """Turn the ``probe`` argument into a ProbeSet, checking it and the arguments that shape its batches."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"`probe_batch_size` must be a positive integer or None, got {batch_size!r}.")
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"`collate_fn` must be callable or None, got {type(collate_fn).__name__}.")
    if isinstance(probe, ProbeSet):
        if batch_size is not None or collate_fn is not None:
            raise ValueError(
                "`probe_batch_size` and `collate_fn` apply to a list or dataset of examples; the ProbeSet passed as "
                "`probe` has its own batch size and collator. Set them on the ProbeSet instead."
            )
        return probe
    if isinstance(probe, int):
        raise TypeError(
            f"`probe` must be a list or dataset of tokenized examples or a ProbeSet, got the number {probe!r}. "
            "An Accelerate loop has no evaluation set to draw from, so pass the examples themselves."
        )
    if isinstance(probe, (str, bytes, Mapping)) or not (hasattr(probe, "__len__") and hasattr(probe, "__getitem__")):
        raise TypeError(
            "`probe` must be a list or indexable dataset of tokenized example dicts, or a ProbeSet; got "
            f"{type(probe).__name__}."
        )
    if len(probe) == 0:
        raise ValueError("`probe` is empty. Pass at least one tokenized example per process.")
    examples = [probe[index] for index in range(len(probe))]
    return ProbeSet(examples, collate_fn=collate_fn, batch_size=batch_size or DEFAULT_PROBE_BATCH_SIZE)
