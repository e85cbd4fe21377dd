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

from .capture import (
    POOLING_METHODS,
    LayerSpec,
    capture_activations,
    model_device,
    resolve_layers,
    unwrap_model,
)
from .distributed import all_succeeded, gather_rows, shard_bounds, world
from .probe import ProbeSet
from .result import CaptureResult
from .sinks import JsonLinesSink, SnapshotSink, TensorBoardSink
from .store import SnapshotStore
from .tracker import SimilarityTracker

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
    """

    def __init__(
        self,
        tracker: SimilarityTracker,
        layers: Sequence[str] | None = None,
        pooling: str = "mean",
        max_consecutive_failures: int = 3,
        tokens_per_example: int = 8,
        seed: int = 0,
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

        self.layers: list[LayerSpec] | None = None
        self.probe: ProbeSet | None = None
        self.sinks: list = []
        self.results: list[CaptureResult] = []
        self._local_probe: ProbeSet | None = None
        self._shard_start = 0
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
        self.layers = resolve_layers(model, self.layer_patterns)
        # The wrapper's forward (DDP's takes *inputs, **kwargs) names no fields; the user's module does.
        probe.restrict_to_model(unwrap_model(model))
        self.tracker.check_probe_size(len(probe))
        self.probe = probe
        # Each process runs its contiguous share of the probe set; the shares are gathered at every capture.
        rank, world_size = world()
        self._shard_start, shard_stop = shard_bounds(len(probe), rank, world_size)
        self._local_probe = probe.shard(self._shard_start, shard_stop) if world_size > 1 else probe
        fingerprint = probe.fingerprint()
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
        logger.info(
            "Similarity monitor started: %d layers %s, %d probe examples over %d process(es), writing to %s",
            len(self.layers),
            [spec.name for spec in self.layers],
            len(probe),
            world_size,
            [type(sink).__name__ for sink in self.sinks] if log_dir is None else log_dir,
        )

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

    def capture(self, model: nn.Module, step: int, strict: bool = False) -> CaptureResult | None:
        """Capture at ``step`` and write the result; return None if the capture failed or monitoring is off.

        Args:
            model: The model being trained.
            step: The optimizer step the capture belongs to.
            strict: Raise errors instead of logging them; used for the initial capture, so that a broken
                configuration stops the run before training starts.
        """
        if not self.enabled:
            return None
        if self.layers is None or self.probe is None:
            raise RuntimeError("Monitor.capture() called before Monitor.start().")
        result = None
        error: Exception | None = None
        try:
            activations, forward_seconds = self._capture_local(model)
        except Exception as caught:  # any failure inside a capture must not stop training
            error = caught
        # Collective: every process takes part, also one whose own capture failed, so that none waits alone.
        if all_succeeded(error is None):
            try:
                result = self._compare(step, activations, forward_seconds)
            except Exception as caught:
                error = caught
        elif error is None:
            error = RuntimeError(f"The similarity capture at step {step} failed on another process.")

        if error is not None:
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
        return result

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

    def _compare(self, step: int, local_activations: dict, forward_seconds: float) -> CaptureResult:
        activations = gather_rows(local_activations, len(self.probe), self.tracker.rows_per_example)
        result = self.tracker.update(step, activations)
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
        result.activations = None
        result.timings["logging"] = time.perf_counter() - start

    def close(self) -> None:
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
