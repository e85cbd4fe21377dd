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

from torch import nn

from .capture import POOLING_METHODS, LayerSpec, capture_activations, resolve_layers
from .probe import ProbeSet
from .result import CaptureResult
from .sinks import JsonLinesSink, TensorBoardSink
from .tracker import SimilarityTracker

logger = logging.getLogger(__name__)

__all__ = ["Monitor"]


class Monitor:
    """Capture a model's layers on a probe set and log their similarities.

    Args:
        tracker: Computes the similarities and keeps the reference captures.
        layers: Module names or glob patterns, or None for the embeddings and every transformer block.
        pooling: How token activations become one vector per example: ``"mean"``, ``"first"`` or ``"last"``.
        max_consecutive_failures: Captures that may fail in a row before monitoring stops.
    """

    def __init__(
        self,
        tracker: SimilarityTracker,
        layers: Sequence[str] | None = None,
        pooling: str = "mean",
        max_consecutive_failures: int = 3,
    ) -> None:
        if pooling not in POOLING_METHODS:
            raise ValueError(f"`pooling` must be one of {POOLING_METHODS}, got {pooling!r}.")
        if layers is not None and not isinstance(layers, str):
            layers = list(layers)
            if not layers or not all(isinstance(name, str) for name in layers):
                raise ValueError(
                    f"`layers` must be None or a non-empty list of module names or patterns, got {layers!r}."
                )
        self.tracker = tracker
        self.layer_patterns = layers
        self.pooling = pooling
        self.max_consecutive_failures = max_consecutive_failures

        self.layers: list[LayerSpec] | None = None
        self.probe: ProbeSet | None = None
        self.sinks: list = []
        self.results: list[CaptureResult] = []
        self.enabled = True
        self._consecutive_failures = 0

    @property
    def last_step(self) -> int | None:
        return self.tracker.history_steps[-1] if self.tracker.history_steps else None

    def start(
        self, model: nn.Module, probe: ProbeSet, log_dir: str | os.PathLike | None, is_main_process: bool = True
    ) -> None:
        """Resolve the layers, check the probe set and open the sinks; every configuration error raises here."""
        self.layers = resolve_layers(model, self.layer_patterns)
        probe.restrict_to_model(model)
        self.tracker.check_probe_size(len(probe))
        self.probe = probe
        if is_main_process and log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.sinks = [
                TensorBoardSink(log_dir, self.tracker.measures),
                JsonLinesSink(Path(log_dir) / "contrasim.jsonl"),
            ]
            logger.info("Similarity monitor writes to %s (layers: %s)", log_dir, [s.name for s in self.layers])

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
        try:
            result = self._capture(model, step)
        except Exception:
            if strict:
                raise
            self._consecutive_failures += 1
            logger.exception(
                "Similarity capture at step %d failed (%d in a row); training continues.",
                step,
                self._consecutive_failures,
            )
            if self._consecutive_failures >= self.max_consecutive_failures:
                self.enabled = False
                logger.error(
                    "Similarity monitoring stopped after %d failed captures in a row.", self._consecutive_failures
                )
            return None
        self._consecutive_failures = 0
        self.results.append(result)
        self._write(result)
        return result

    def _capture(self, model: nn.Module, step: int) -> CaptureResult:
        start = time.perf_counter()
        activations = capture_activations(model, self.probe.batches(), self.layers, self.pooling)
        forward_seconds = time.perf_counter() - start
        result = self.tracker.update(step, activations)
        result.timings["probe_forward"] = forward_seconds
        return result

    def _write(self, result: CaptureResult) -> None:
        start = time.perf_counter()
        for sink in list(self.sinks):
            try:
                sink.write(result)
            except OSError as error:
                # A full disk or an unwritable folder: report once and stop this sink; training goes on.
                logger.error(
                    "Writing similarities with %s failed (%s); this sink is switched off.", type(sink).__name__, error
                )
                self.sinks.remove(sink)
        result.timings["logging"] = time.perf_counter() - start

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except OSError as error:
                logger.error("Closing %s failed: %s", type(sink).__name__, error)
        self.sinks = []
