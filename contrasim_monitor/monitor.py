"""The framework-independent monitor: probe forward, similarity tracking and sinks, with a failure policy.

The Trainer callback and the Accelerate monitor both drive this class. After the first capture succeeds, no
error inside a capture reaches the training loop: it is logged with its traceback and training goes on, and
monitoring switches itself off after ``max_consecutive_failures`` failures in a row.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .budget import CaptureBudget, CaptureLevel
from .capture import (
    POOLING_METHODS,
    LayerSpec,
    capture_activations,
    has_sharded_parameters,
    model_device,
    resolve_layers,
    unwrap_model,
)
from .distributed import agree_on_minimum, all_succeeded, gather_rows, same_on_all_processes, shard_bounds, world
from .presets import validate_budget
from .probe import ProbeSet
from .result import CaptureResult
from .sinks import JsonLinesSink, SnapshotSink, TensorBoardSink
from .store import SnapshotStore
from .tracker import CLOSED_FORM_MEASURES, SimilarityTracker

logger = logging.getLogger(__name__)

__all__ = ["Monitor"]


class Monitor:
    """Capture a model's layers on a probe set and log their similarities.

    Args:
        tracker: Computes the similarities and keeps the reference captures.
        layers: Module names or glob patterns, or None for the embeddings and every transformer block.
        pooling: How token activations become vectors: ``"mean"`` over non-padding tokens, ``"first"`` token,
            ``"last"`` non-padding token, or ``"sample"``: ``tokens_per_example`` seeded token positions per example,
            each a row of its own.
        tokens_per_example: Positions drawn per example with ``pooling="sample"``.
        seed: Seed of the positions drawn with ``pooling="sample"``.
        max_consecutive_failures: Captures that may fail in a row before monitoring stops.
        budget: Fraction of the training wall time the monitor may spend, or None for no limit. Under a budget,
            a capture whose estimated cost does not fit in what is left is taken with the closed-form measures
            only, or skipped; the initial capture has no ContraSim heads, and a final capture (``final=True``)
            always runs, at least with the closed-form measures. Every process takes the same decision.
    """

    def __init__(
        self,
        tracker: SimilarityTracker,
        layers: Sequence[str] | None = None,
        pooling: str = "mean",
        max_consecutive_failures: int = 3,
        tokens_per_example: int = 8,
        seed: int = 0,
        budget: float | None = None,
    ) -> None:
        if pooling not in POOLING_METHODS:
            raise ValueError(f"`pooling` must be one of {POOLING_METHODS}, got {pooling!r}.")
        if layers is not None and not isinstance(layers, str):
            layers = list(layers)
            if not layers or not all(isinstance(name, str) for name in layers):
                raise ValueError(
                    f"`layers` must be None or a non-empty list of module names or patterns, got {layers!r}."
                )
        if isinstance(tokens_per_example, bool) or not isinstance(tokens_per_example, int) or tokens_per_example <= 0:
            raise ValueError(f"`tokens_per_example` must be a positive integer, got {tokens_per_example!r}.")
        self.tracker = tracker
        self.layer_patterns = layers
        self.pooling = pooling
        self.tokens_per_example = tokens_per_example
        self.seed = seed
        self.tracker.rows_per_example = tokens_per_example if pooling == "sample" else 1
        self.max_consecutive_failures = max_consecutive_failures
        fraction = validate_budget(budget)
        self.budget = None if fraction is None else CaptureBudget(fraction)
        self._closed_form_seconds: float | None = None
        self._budget_reported = False

        self.layers: list[LayerSpec] | None = None
        self.probe: ProbeSet | None = None
        self.sinks: list = []
        self.results: list[CaptureResult] = []
        self._local_probe: ProbeSet | None = None
        self._shard_start = 0
        self._replicated = False
        self.enabled = True
        self._consecutive_failures = 0

    @property
    def last_step(self) -> int | None:
        return self.tracker.history_steps[-1] if self.tracker.history_steps else None

    def start(
        self,
        model: nn.Module,
        probe: ProbeSet,
        log_dir: str | os.PathLike | None = None,
        is_main_process: bool = True,
        sinks: Sequence | None = None,
        store: SnapshotStore | None = None,
        resume_step: int | None = None,
        writer=None,
    ) -> None:
        """Resolve the layers, check the probe set and open the sinks; every configuration error raises here.

        Args:
            model: The model being trained, possibly wrapped.
            probe: The probe set; under several processes each takes its contiguous share of it.
            log_dir: Folder for a TensorBoard event file and ``contrasim.jsonl``, used when ``sinks`` is None.
            is_main_process: Only the main process opens sinks and writes.
            sinks: Objects with ``write(result)`` and ``close()`` to use instead of the default ones.
            store: Snapshot store that keeps every capture's activations (written by the main process only).
            resume_step: The optimizer step a resumed run starts from. The series continues from the store's
                captures up to this step, later ones (an abandoned continuation) are dropped, and TensorBoard
                hides events from this step on in earlier event files.
            writer: An existing ``SummaryWriter`` writing into ``log_dir`` (such as the Trainer's own) to use
                instead of a new event file.

        Raises:
            ValueError: For layer names that match nothing, a probe set too small for the ContraSim split, or a
                store written with a different probe set.
        """
        self.close()
        self.results = []
        self.enabled = True
        self._consecutive_failures = 0
        self._closed_form_seconds = None
        self._budget_reported = False
        if self.budget is not None:
            self.budget.start()
        self.layers = resolve_layers(model, self.layer_patterns)
        # The wrapper's forward (DDP's takes *inputs, **kwargs) names no fields; the user's module does.
        probe.restrict_to_model(unwrap_model(model))
        self.tracker.check_probe_size(len(probe))
        self.probe = probe
        # Each process runs its contiguous share of the probe set; the shares are gathered at every capture.
        # Under FSDP each forward pass is collective, so every process must run the same batches: each runs the
        # whole probe set and nothing is gathered.
        # NOTE: under FSDP, a probe forward pass that raises on one process leaves the others waiting inside FSDP's
        # own parameter gather, so that failure can hang the run. Without FSDP the failure is agreed and logged.
        rank, world_size = world()
        self._replicated = world_size > 1 and has_sharded_parameters(model)
        if world_size > 1 and not self._replicated:
            self._shard_start, shard_stop = shard_bounds(len(probe), rank, world_size)
            self._local_probe = probe.shard(self._shard_start, shard_stop)
        else:
            self._shard_start, self._local_probe = 0, probe
        fingerprint = probe.fingerprint()
        if world_size > 1:
            # Collective: different probe sets or budgets would fail later inside gloo or NCCL with no useful message.
            settings = f"{fingerprint}|{self.pooling}|{self.tokens_per_example}|{self.budget is not None}"
            if not same_on_all_processes(settings):
                raise ValueError(
                    "The processes of this run have different probe sets or monitor settings (probe fingerprint, "
                    "pooling, tokens_per_example, budget on or off). Build the probe set and the monitor the same way "
                    "on every process."
                )
        if store is not None and store.fingerprint is not None:
            store.check_fingerprint(fingerprint)

        history: list[dict] = []
        jsonl = JsonLinesSink(Path(log_dir) / "contrasim.jsonl") if log_dir is not None else None
        resumed = resume_step is not None and store is not None and any(s <= resume_step for s in store.steps())
        if resumed and is_main_process:
            store.truncate_after(resume_step)
            if jsonl is not None:
                history = jsonl.truncate_after(resume_step)
        if resumed:
            self._restore(store, resume_step, model_device(model), history)

        if not is_main_process:
            return
        if sinks is not None:
            self.sinks = list(sinks)
        elif log_dir is not None:
            try:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                purge_step = resume_step + 1 if resume_step is not None and writer is None else None
                tensorboard = TensorBoardSink(log_dir, self.tracker.measures, writer=writer, purge_step=purge_step)
                self.sinks = [tensorboard, jsonl]
            except OSError as error:
                # An unwritable folder must not stop training: the results stay available in `results`.
                logger.error("Cannot write to log folder %s (%s); similarities are not logged.", log_dir, error)
        if store is not None:
            self.sinks.append(SnapshotSink(store, fingerprint))
            self._store_probe(store, probe, fingerprint)
        logger.info(
            "Similarity monitor started: %d layers %s, %d probe examples over %d process(es), writing to %s",
            len(self.layers),
            [spec.name for spec in self.layers],
            len(probe),
            world_size,
            [type(sink).__name__ for sink in self.sinks] if log_dir is None else log_dir,
        )

    def _store_probe(self, store: SnapshotStore, probe: ProbeSet, fingerprint: str) -> None:
        """Keep the probe set's inputs with the store, so that saved models can be captured on it later."""
        settings = {
            "pooling": self.pooling,
            "tokens_per_example": self.tokens_per_example,
            "seed": self.seed,
            "held_out_fraction": self.tracker.held_out_fraction,
        }
        try:
            if store.read_probe() is None:
                store.write_probe(probe.examples, fingerprint, settings)
        except (OSError, ValueError) as error:  # only later comparisons need it, so training goes on
            logger.warning("Could not store the probe set with the snapshots in %s: %s", store.root, error)

    def _restore(self, store: SnapshotStore, resume_step: int, device: torch.device, history: list[dict]) -> None:
        steps = [step for step in store.steps() if step <= resume_step]
        initial = (steps[0], store.load(steps[0], device=device))
        previous = (steps[-1], store.load(steps[-1], device=device))
        past = [(record["step"], _vs_init_values(record)) for record in history if record["step"] < steps[-1]]
        if history and history[-1]["step"] == steps[-1]:
            past.append((steps[-1], _vs_init_values(history[-1])))
        self.tracker.restore(initial, previous, past)
        logger.info(
            "Similarity monitor resumes at step %d from stored captures at steps %d (initial) and %d (previous).",
            resume_step,
            steps[0],
            steps[-1],
        )

    def capture(self, model: nn.Module, step: int, strict: bool = False, final: bool = False) -> CaptureResult | None:
        """Capture at ``step`` and write the result; return None if the capture failed, was skipped or monitoring
        is off.

        Args:
            model: The model being trained.
            step: The optimizer step the capture belongs to.
            strict: Raise errors instead of logging them; used for the initial capture, so that a broken
                configuration stops the run before training starts.
            final: This is the last capture of the run; under a budget it is taken at least with the closed-form
                measures.
        """
        if not self.enabled:
            return None
        if self.layers is None or self.probe is None:
            raise RuntimeError("Monitor.capture() called before Monitor.start().")
        measures = self._planned_measures(step, final)
        if measures is None:
            return None
        started = time.perf_counter()
        result = None
        error: Exception | None = None
        try:
            activations, forward_seconds = self._capture_local(model)
        except Exception as caught:  # any failure inside a capture must not stop training
            error = caught
        # Collective: every process takes part, also one whose own capture failed, so that none waits alone.
        if all_succeeded(error is None):
            try:
                result = self._compare(step, activations, forward_seconds, measures)
            except Exception as caught:
                error = caught
        elif error is None:
            error = RuntimeError(f"The similarity capture at step {step} failed on another process.")

        if error is not None:
            self._charge(time.perf_counter() - started)
            if strict:
                raise error
            self._consecutive_failures += 1
            logger.error(
                "Similarity capture at step %d failed (%d in a row); training continues.",
                step,
                self._consecutive_failures,
                exc_info=error,
            )
            if self._consecutive_failures >= self.max_consecutive_failures:
                self.enabled = False
                logger.error(
                    "Similarity monitoring stopped after %d failed captures in a row.", self._consecutive_failures
                )
            return None
        self._consecutive_failures = 0
        if self.results:
            # Only the newest result keeps the history matrix, which grows with every capture.
            self.results[-1].vs_init_history = {}
        self.results.append(result)
        self._write(result)
        # Collective: a process whose outputs all failed stops, so every process stops with it.
        if not all_succeeded(self.enabled):
            self.enabled = False
        self._closed_form_seconds = sum(
            result.timings.get(name, 0.0) for name in ("probe_forward", "logging", *CLOSED_FORM_MEASURES)
        )
        self._charge(time.perf_counter() - started)
        if self.budget is not None and self.tracker.seconds_per_head is None:
            self._calibrate()
        return result

    def _planned_measures(self, step: int, final: bool) -> tuple[str, ...] | None:
        """Choose the measures of the capture at ``step`` within the budget, the same on every process.

        Returns:
            The measures to compute, or None to skip the capture.
        """
        measures = self.tracker.measures
        closed_form = tuple(m for m in measures if m in CLOSED_FORM_MEASURES)
        if self.budget is None:
            return measures
        if self.tracker.initial is None:
            # The initial capture is the reference of every later comparison, so it always runs, and its
            # layer x layer ContraSim heads are left out to keep it cheap.
            return closed_form
        contrasim_seconds = self.tracker.estimate_contrasim_seconds()
        closed_form_seconds = self._closed_form_seconds or 0.0
        if contrasim_seconds is None:
            contrasim_seconds = 0.0 if "contrasim" not in measures else float("inf")
        level = self.budget.plan(closed_form_seconds, closed_form_seconds + contrasim_seconds, final=final)
        level = agree_on_minimum(level)
        if level == CaptureLevel.FULL or (final and not closed_form):
            return measures
        if level == CaptureLevel.CLOSED_FORM and closed_form:
            if closed_form != measures:
                self.budget.closed_form_steps.append(step)
                if len(self.budget.closed_form_steps) == 1:
                    logger.warning(
                        "Took the capture at step %d without ContraSim heads to keep the monitor within %.0f%% of "
                        "the training time; later ones are counted and reported when monitoring stops.",
                        step,
                        100 * self.budget.fraction,
                    )
            return closed_form
        self.budget.skipped_steps.append(step)
        if len(self.budget.skipped_steps) == 1:
            logger.warning(
                "Skipped the scheduled capture at step %d to keep the monitor within %.0f%% of the training time; "
                "later skips are counted and reported when monitoring stops. Pass budget=None to capture at "
                "every scheduled step.",
                step,
                100 * self.budget.fraction,
            )
        return None

    def _calibrate(self) -> None:
        """Time one small ContraSim fit on the newest capture, so the budget can estimate the cost of heads."""
        previous = self.tracker.previous
        if previous is None:
            return
        start = time.perf_counter()
        try:
            self.tracker.calibrate_contrasim(dict(zip(self.tracker.layers, previous.tensors)))
        except Exception as error:  # only the estimate is lost; the budget then keeps ContraSim off
            logger.warning("Timing a ContraSim head for the budget failed (%s); ContraSim heads stay off.", error)
            self.tracker.seconds_per_head = float("inf")
        self._charge(time.perf_counter() - start)

    def _charge(self, seconds: float) -> None:
        if self.budget is not None:
            self.budget.charge(seconds)

    def _capture_local(self, model: nn.Module) -> tuple[dict, float]:
        start = time.perf_counter()
        activations = capture_activations(
            model,
            self._local_probe.batches(),
            self.layers,
            self.pooling,
            tokens_per_example=self.tokens_per_example,
            seed=self.seed,
            first_example_index=self._shard_start,
        )
        return activations, time.perf_counter() - start

    def _compare(
        self, step: int, local_activations: dict, forward_seconds: float, measures: tuple[str, ...]
    ) -> CaptureResult:
        activations = local_activations
        if not self._replicated:
            activations = gather_rows(local_activations, len(self.probe), self.tracker.rows_per_example)
        result = self.tracker.update(step, activations, measures)
        result.timings["probe_forward"] = forward_seconds
        result.activations = activations
        return result

    def _write(self, result: CaptureResult) -> None:
        start = time.perf_counter()
        for sink in list(self.sinks):
            try:
                sink.write(result)
            except Exception as error:  # a full disk or an unwritable folder must not stop training
                logger.error(
                    "Writing the capture at step %d with %s failed (%s: %s); this sink is switched off and the others "
                    "go on.",
                    result.step,
                    type(sink).__name__,
                    type(error).__name__,
                    error,
                )
                self.sinks.remove(sink)
                if not self.sinks:
                    self.enabled = False
                    logger.error(
                        "Every output of the similarity monitor has failed, so monitoring stops at step %d; "
                        "training continues, and what was written before stays as it is.",
                        result.step,
                    )
        result.activations = None
        result.timings["logging"] = time.perf_counter() - start

    def close(self) -> None:
        budget = self.budget
        if budget is not None and (budget.skipped_steps or budget.closed_form_steps) and not self._budget_reported:
            self._budget_reported = True
            logger.warning(
                "Within the budget of %.0f%% of training time (%.1f s spent of %.1f s trained), %d scheduled "
                "capture(s) were skipped and %d were taken without ContraSim heads.",
                100 * budget.fraction,
                budget.spent,
                budget.training_seconds,
                len(budget.skipped_steps),
                len(budget.closed_form_steps),
            )
        for sink in self.sinks:
            try:
                sink.close()
            except OSError as error:
                logger.error("Closing %s failed: %s", type(sink).__name__, error)
        self.sinks = []


def _vs_init_values(record: dict) -> dict[str, np.ndarray]:
    """Read a JSON lines record's ``vs_init`` values back as arrays, with None (written for NaN) as NaN."""
    return {
        measure: np.array([np.nan if v is None else v for v in values], dtype=float)
        for measure, values in record.get("vs_init", {}).items()
    }
