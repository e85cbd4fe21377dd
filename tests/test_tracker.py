"""SimilarityTracker on synthetic activations, and the Monitor's failure policy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.tracker import SimilarityTracker

FAST = ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5)


def activations(seed: int, layers: int = 3, examples: int = 64, width: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(examples, width, generator=generator)
    result = {}
    for index in range(layers):
        base = torch.tanh(base @ torch.randn(width, width, generator=generator) / width**0.5 + base)
        result[f"layer.{index}"] = base.clone()
    return result


def test_first_capture_is_identity_against_itself():
    tracker = SimilarityTracker(contrasim=FAST)
    result = tracker.update(0, activations(0))
    for measure in ("contrasim", "cka"):
        np.testing.assert_allclose(result.vs_init[measure], 1.0, atol=1e-9)
        np.testing.assert_allclose(np.diag(result.cross_layer[measure]), 1.0, atol=1e-9)
        np.testing.assert_allclose(result.cross_layer[measure], result.cross_layer[measure].T)
    assert result.vs_previous == {}
    assert result.previous_step is None


def test_second_capture_previous_equals_initial():
    tracker = SimilarityTracker(contrasim=FAST)
    tracker.update(0, activations(0))
    result = tracker.update(5, activations(1))
    assert result.previous_step == 0
    for measure in ("contrasim", "cka"):
        np.testing.assert_array_equal(result.vs_previous[measure], result.vs_init[measure])
        assert np.all(result.vs_init[measure] < 1.0)
    assert result.history_steps == [0, 5]
    assert result.vs_init_history["cka"].shape == (3, 2)


def test_third_capture_compares_with_previous():
    tracker = SimilarityTracker(contrasim=FAST)
    tracker.update(0, activations(0))
    tracker.update(1, activations(1))
    repeated = tracker.update(2, activations(1))
    assert repeated.previous_step == 1
    # The same activations as the previous capture: identical representations score 1 in both measures.
    np.testing.assert_allclose(repeated.vs_previous["cka"], 1.0, atol=1e-9)
    assert np.all(repeated.vs_previous["contrasim"] > 0.99)
    assert np.all(repeated.vs_init["cka"] < 0.999)


def test_non_finite_layer_is_nan_and_reported_once(caplog):
    tracker = SimilarityTracker(contrasim=FAST)
    tracker.update(0, activations(0))
    broken = activations(1)
    broken["layer.1"][3, 2] = float("nan")
    with caplog.at_level(logging.WARNING, logger="contrasim_monitor.tracker"):
        first = tracker.update(1, broken)
        second = tracker.update(2, broken)
    for result in (first, second):
        assert result.unusable_layers == ["layer.1"]
        for measure in ("contrasim", "cka"):
            assert np.isnan(result.vs_init[measure][1])
            assert np.isfinite(result.vs_init[measure][[0, 2]]).all()
            assert np.isnan(result.cross_layer[measure][1]).all()
            assert np.isfinite(result.cross_layer[measure][0, 2])
    warnings = [r for r in caplog.records if "layer.1" in r.getMessage()]
    assert len(warnings) == 1
    assert "non-finite" in warnings[0].getMessage()


def test_constant_layer_is_nan():
    tracker = SimilarityTracker(contrasim=FAST)
    values = activations(0)
    values["layer.0"] = torch.zeros_like(values["layer.0"])
    result = tracker.update(0, values)
    assert result.unusable_layers == ["layer.0"]
    assert np.isnan(result.cross_layer["contrasim"][0, 1])
    assert np.isnan(result.cross_layer["cka"][0, 1])


def test_steps_must_increase():
    tracker = SimilarityTracker(measures=["cka"])
    tracker.update(3, activations(0))
    with pytest.raises(ValueError, match="must increase"):
        tracker.update(3, activations(1))


def test_layers_must_not_change():
    tracker = SimilarityTracker(measures=["cka"])
    tracker.update(0, activations(0, layers=3))
    with pytest.raises(ValueError, match="earlier captures"):
        tracker.update(1, activations(0, layers=2))


def test_probe_too_small_names_minimum():
    tracker = SimilarityTracker()
    with pytest.raises(ValueError, match="at least 64 examples"):
        tracker.check_probe_size(40)
    tracker.check_probe_size(64)
    SimilarityTracker(measures=["cka"]).check_probe_size(5)  # CKA alone has no split


class _Flaky(nn.Module):
    """A model whose forward raises while `fail` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise FloatingPointError("injected")
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def _probe() -> ProbeSet:
    generator = torch.Generator().manual_seed(0)
    return ProbeSet([{"x": torch.randn(8, generator=generator)} for _ in range(64)], batch_size=32)


def test_monitor_logs_failed_capture_and_continues(caplog, tmp_path):
    model = _Flaky()
    monitor = Monitor(SimilarityTracker(measures=["cka"]), max_consecutive_failures=2)
    monitor.start(model, _probe(), tmp_path)
    assert monitor.capture(model, 0, strict=True) is not None

    model.fail = True
    with caplog.at_level(logging.ERROR, logger="contrasim_monitor.monitor"):
        assert monitor.capture(model, 1) is None
        assert monitor.enabled
        assert monitor.capture(model, 2) is None
    assert not monitor.enabled
    assert any("injected" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert any("stopped" in r.getMessage() for r in caplog.records)

    model.fail = False
    assert monitor.capture(model, 3) is None  # switched off for good
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    monitor.close()


def test_monitor_strict_capture_raises():
    model = _Flaky()
    model.fail = True
    monitor = Monitor(SimilarityTracker(measures=["cka"]))
    monitor.start(model, _probe(), None)
    with pytest.raises(FloatingPointError):
        monitor.capture(model, 0, strict=True)


def test_unwritable_sink_is_switched_off(tmp_path, caplog):
    model = _Flaky()
    monitor = Monitor(SimilarityTracker(measures=["cka"]))
    monitor.start(model, _probe(), tmp_path)
    jsonl = tmp_path / "contrasim.jsonl"
    jsonl.mkdir()  # opening a folder for appending raises IsADirectoryError, an OSError
    with caplog.at_level(logging.ERROR, logger="contrasim_monitor.monitor"):
        assert monitor.capture(model, 0) is not None
        assert monitor.capture(model, 1) is not None
    errors = [r for r in caplog.records if "JsonLinesSink" in r.getMessage()]
    assert len(errors) == 1
    assert [type(s).__name__ for s in monitor.sinks] == ["TensorBoardSink"]
    monitor.close()


def test_sampled_rows_split_by_example():
    tracker = SimilarityTracker(contrasim=FAST)
    tracker.rows_per_example = 4
    tracker.update(0, activations(0, examples=64 * 4))
    train = set(tracker._train_index.tolist())
    test = set(tracker._test_index.tolist())
    assert not train & test
    assert len(train) + len(test) == 256
    # All four rows of an example fall on the same side.
    train_examples = {row // 4 for row in train}
    test_examples = {row // 4 for row in test}
    assert not train_examples & test_examples
    assert len(test_examples) == 16


def test_monitor_keeps_probe_fields_of_wrapped_model(tmp_path):
    import os

    import torch.distributed as dist

    from contrasim_monitor.capture import unwrap_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(_Flaky())
        monitor = Monitor(SimilarityTracker(measures=["cka"]), layers=["blocks.*"])
        monitor.start(model, _probe(), None)
        assert set(monitor.probe.examples[0]) == {"x"}
        assert monitor.capture(model, 0, strict=True) is not None
        assert unwrap_model(model) is model.module
    finally:
        dist.destroy_process_group()
