"""Presets and the cost budget: which captures run, with which measures, and what they cost."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from contrasim_monitor.integrations.transformers import ContraSimCallback
from tb_events import load_events
from tiny_models import pad_collate, tiny_bert, token_dataset

from contrasim_monitor.budget import CaptureBudget, CaptureLevel
from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.monitor import Monitor
from contrasim_monitor.presets import PRESETS, resolve_preset
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.schedule import EveryNSteps, LogSpaced
from contrasim_monitor.tracker import SimilarityTracker

FAST = ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5)


class ManualClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def budgeted_monitor(tmp_path, fraction: float = 0.1):
    """Return a started monitor under a budget, its model, and the clock that the test advances."""
    monitor = Monitor(SimilarityTracker(contrasim=FAST), budget=fraction)
    probe = ProbeSet(token_dataset(64, seed=3), pad_collate, batch_size=32)
    model = tiny_bert()
    monitor.start(model, probe, log_dir=tmp_path)
    clock = ManualClock()
    monitor.budget.clock = clock
    monitor.budget.start()
    return monitor, model, clock


# Presets


def test_default_preset_is_light():
    preset, schedule, budget = resolve_preset("light", None, "auto")
    assert preset.probe_size == 256
    assert isinstance(schedule, LogSpaced)
    assert budget == 0.03


def test_explicit_schedule_drops_auto_budget():
    _, schedule, budget = resolve_preset("light", 10, "auto")
    assert isinstance(schedule, EveryNSteps)
    assert budget is None


def test_explicit_budget_kept_with_schedule():
    _, _, budget = resolve_preset("light", 10, 0.2)
    assert budget == 0.2


def test_thorough_preset_has_no_budget():
    preset, _, budget = resolve_preset("thorough", None, "auto")
    assert budget is None
    assert preset.probe_size == 1024


def test_presets_ordered_light_to_thorough():
    assert PRESETS["light"].probe_size < PRESETS["standard"].probe_size < PRESETS["thorough"].probe_size
    assert PRESETS["light"].budget < PRESETS["standard"].budget


@pytest.mark.parametrize("preset", ["heavy", "", None, 3])
def test_unknown_preset_rejected(preset):
    with pytest.raises(ValueError, match="`preset` must be one of"):
        resolve_preset(preset, None, "auto")


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "half", [0.1]])
def test_invalid_budget_rejected(budget):
    with pytest.raises(ValueError, match="`budget`"):
        resolve_preset("light", None, budget)


def test_callback_takes_probe_size_from_preset():
    assert ContraSimCallback().probe == 256
    assert ContraSimCallback(preset="thorough").probe == 1024
    assert ContraSimCallback(preset="thorough", probe=100).probe == 100


def test_callback_rejects_bad_preset_at_construction():
    with pytest.raises(ValueError, match="`preset` must be one of"):
        ContraSimCallback(preset="fast")
    with pytest.raises(ValueError, match="`budget`"):
        ContraSimCallback(budget=2.0)


def test_callback_budget_follows_schedule_choice():
    assert ContraSimCallback().monitor.budget.fraction == 0.03
    assert ContraSimCallback(schedule=5).monitor.budget is None
    assert ContraSimCallback(schedule=5, budget=0.05).monitor.budget.fraction == 0.05
    assert ContraSimCallback(budget=None).monitor.budget is None


# CaptureBudget


def test_budget_plan_levels():
    clock = ManualClock()
    budget = CaptureBudget(0.1, clock=clock)
    clock.now = 100.0  # 100 s of training: 10 s may be spent
    assert budget.plan(closed_form_cost=1.0, full_cost=5.0) == CaptureLevel.FULL
    budget.charge(8.0)  # training time is now 92 s, so 9.2 s may be spent, 1.2 s of it left
    assert budget.available == pytest.approx(1.2)
    assert budget.plan(closed_form_cost=1.0, full_cost=5.0) == CaptureLevel.CLOSED_FORM
    budget.charge(1.0)
    assert budget.plan(closed_form_cost=1.0, full_cost=5.0) == CaptureLevel.SKIP
    assert budget.plan(closed_form_cost=1.0, full_cost=5.0, final=True) == CaptureLevel.CLOSED_FORM


def test_budget_training_time_excludes_monitor_time():
    clock = ManualClock()
    budget = CaptureBudget(0.5, clock=clock)
    clock.now = 10.0
    budget.charge(4.0)
    assert budget.training_seconds == pytest.approx(6.0)


# Monitor under a budget


def test_initial_capture_has_no_contrasim_heads(tmp_path):
    monitor, model, _ = budgeted_monitor(tmp_path)
    result = monitor.capture(model, 0, strict=True)
    assert list(result.cross_layer) == ["cka"]
    # The initial capture is timed and a head is calibrated, so later captures can be planned.
    assert monitor.tracker.seconds_per_head is not None
    assert monitor.budget.spent > 0


def test_capture_skipped_without_training_time(tmp_path, caplog):
    monitor, model, _ = budgeted_monitor(tmp_path)
    monitor.capture(model, 0, strict=True)
    with caplog.at_level(logging.INFO, logger="contrasim_monitor.monitor"):
        assert monitor.capture(model, 1) is None
        assert monitor.capture(model, 2) is None
    assert monitor.budget.skipped_steps == [1, 2]
    skip_messages = [r for r in caplog.records if "Skipped the scheduled capture" in r.getMessage()]
    assert len(skip_messages) == 1
    with caplog.at_level(logging.INFO, logger="contrasim_monitor.monitor"):
        monitor.close()
    assert any("2 scheduled capture(s) were skipped" in r.getMessage() for r in caplog.records)


def test_final_capture_runs_closed_form(tmp_path):
    monitor, model, _ = budgeted_monitor(tmp_path)
    monitor.capture(model, 0, strict=True)
    result = monitor.capture(model, 5, final=True)
    assert result is not None
    assert list(result.vs_init) == ["cka"]
    assert monitor.budget.closed_form_steps == [5]
    # ContraSim's history column of this step is NaN, so the heatmap shows a gap rather than a made-up value.
    assert np.isnan(result.vs_init_history["contrasim"][:, -1]).all()
    np.testing.assert_allclose(result.vs_init_history["cka"][:, -1], result.vs_init["cka"])


def test_full_capture_when_budget_allows(tmp_path):
    monitor, model, clock = budgeted_monitor(tmp_path)
    monitor.capture(model, 0, strict=True)
    clock.now = 10_000.0
    result = monitor.capture(model, 10)
    assert sorted(result.vs_init) == ["cka", "contrasim"]
    assert sorted(result.cross_layer) == ["cka", "contrasim"]
    assert np.isfinite(result.vs_init["contrasim"]).all()


def test_closed_form_capture_when_heads_do_not_fit(tmp_path):
    monitor, model, clock = budgeted_monitor(tmp_path, fraction=0.1)
    monitor.capture(model, 0, strict=True)
    # Enough training time for the closed-form part, far too little for heads that cost an hour each.
    monitor.tracker.seconds_per_head = 3600.0
    clock.now = 10 * (monitor.budget.spent + 5 * monitor._closed_form_seconds)
    result = monitor.capture(model, 3)
    assert list(result.vs_init) == ["cka"]


def test_tensorboard_has_no_contrasim_at_closed_form_step(tmp_path):
    monitor, model, clock = budgeted_monitor(tmp_path)
    monitor.capture(model, 0, strict=True)
    monitor.capture(model, 4, final=True)
    clock.now = 10_000.0
    monitor.capture(model, 8)
    monitor.close()
    events = load_events(tmp_path)
    tags = events.Tags()["scalars"]
    cka_tag = next(tag for tag in tags if tag.startswith("cka/vs_init/"))
    contrasim_tag = next(tag for tag in tags if tag.startswith("contrasim/vs_init/"))
    assert [event.step for event in events.Scalars(cka_tag)] == [0, 4, 8]
    assert [event.step for event in events.Scalars(contrasim_tag)] == [8]


def test_preset_probe_too_large_names_preset(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=token_dataset(64, seed=1),
        eval_dataset=token_dataset(96, seed=2),
        data_collator=pad_collate,
        callbacks=[ContraSimCallback(preset="standard", log_dir=tmp_path / "tb")],
    )
    with pytest.raises(ValueError, match="comes from the preset"):
        trainer.train()
