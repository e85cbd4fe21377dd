"""SimilarityMonitor in a real single-process Accelerate loop on a tiny BERT, and the GPT-2 example job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from contrasim_monitor.examples import pretrain_gpt2_shakespeare
from contrasim_monitor.integrations.accelerate import SimilarityMonitor
from tb_events import load_events
from tiny_models import pad_collate, tiny_bert, token_dataset

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.probe import ProbeSet
from contrasim_monitor.result import CaptureResult

LAYERS = ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
FAST_CONTRASIM = ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5)
ACCUMULATION = 4


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Reset accelerate's process-wide singletons, so that each test starts its own Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def remaining_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def make_accelerator(tmp_path: Path, log_with: str | None = "tensorboard") -> Accelerator:
    accelerator = Accelerator(
        cpu=True, log_with=log_with, project_dir=str(tmp_path / "project"), gradient_accumulation_steps=ACCUMULATION
    )
    if log_with is not None:
        accelerator.init_trackers("run")
    return accelerator


def prepare_training(accelerator: Accelerator):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(token_dataset(256, seed=1), batch_size=4, collate_fn=pad_collate)
    prepared_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return prepared_model, optimizer, loader


def train(accelerator, model, optimizer, loader, monitor, optimizer_steps: int, after_each=None) -> int:
    """Run the usual accumulate loop for ``optimizer_steps`` optimizer steps and return the micro-batches run."""
    micro_batches = 0
    done = 0
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
        monitor.step()
        micro_batches += 1
        if after_each is not None:
            after_each()
        if accelerator.sync_gradients:
            done += 1
            if done == optimizer_steps:
                break
    return micro_batches


def build_monitor(accelerator, model, **kwargs) -> SimilarityMonitor:
    probe = kwargs.pop("probe", token_dataset(80, seed=2))
    options = {"schedule": 2, "contrasim": FAST_CONTRASIM, "collate_fn": pad_collate, "probe_batch_size": 40}
    options.update(kwargs)
    return SimilarityMonitor(accelerator, model, probe, **options)


def test_monitor_captures_at_expected_steps(tmp_path):
    accelerator = make_accelerator(tmp_path)
    model, optimizer, loader = prepare_training(accelerator)
    monitor = build_monitor(accelerator, model)
    assert [r.step for r in monitor.results] == [0]  # the initial capture happens in the constructor

    with monitor:
        micro_batches = train(accelerator, model, optimizer, loader, monitor, optimizer_steps=7)
    accelerator.end_training()

    assert micro_batches == 7 * ACCUMULATION
    assert monitor.optimizer_step == 7
    # Steps 0 (initial model), 2, 4, 6 (schedule) and 7 (finish); gradient accumulation does not shift them.
    expected_steps = [0, 2, 4, 6, 7]
    assert [r.step for r in monitor.results] == expected_steps
    assert monitor.results[-1].layers == LAYERS

    log_dir = tmp_path / "project" / "run"
    assert monitor.log_dir == str(log_dir)
    records = [json.loads(line) for line in (log_dir / "contrasim.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == expected_steps

    # One event file: accelerate's TensorBoard tracker, which the monitor writes through.
    events = load_events(log_dir, suffix="")
    scalars = events.Tags()["scalars"]
    for measure in ("contrasim", "cka"):
        for layer in LAYERS:
            vs_init = f"{measure}/vs_init/{layer}"
            vs_previous = f"{measure}/vs_previous/{layer}"
            assert vs_init in scalars
            assert vs_previous in scalars
            assert [e.step for e in events.Scalars(vs_init)] == expected_steps
            assert [e.step for e in events.Scalars(vs_previous)] == expected_steps[1:]
        initial = events.Scalars(f"{measure}/vs_init/bert.encoder.layer.2")[0].value
        assert initial == pytest.approx(1.0, abs=1e-6)
        final = events.Scalars(f"{measure}/vs_init/bert.encoder.layer.2")[-1].value
        assert final == pytest.approx(monitor.results[-1].vs_init[measure][3], abs=1e-6)

    images = events.Tags()["images"]
    for tag in ("contrasim/cross_layer", "cka/cross_layer", "contrasim/vs_init_history", "cka/vs_init_history"):
        assert tag in images
        assert [e.step for e in events.Images(tag)] == expected_steps
        first = events.Images(tag)[0]
        assert first.width > 100
        assert first.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert "similarity/summary/text_summary" in events.Tags()["tensors"]


def test_no_hooks_remain_on_model(tmp_path):
    accelerator = make_accelerator(tmp_path)
    model, optimizer, loader = prepare_training(accelerator)
    hook_counts = []
    monitor = build_monitor(accelerator, model, schedule=1, measures=("cka",))
    hook_counts.append(remaining_hooks(model))
    train(
        accelerator, model, optimizer, loader, monitor, 3, after_each=lambda: hook_counts.append(remaining_hooks(model))
    )
    monitor.finish()
    hook_counts.append(remaining_hooks(model))
    assert [r.step for r in monitor.results] == [0, 1, 2, 3]
    assert hook_counts == [0] * len(hook_counts)


def test_finish_skips_captured_last_step(tmp_path):
    accelerator = make_accelerator(tmp_path)
    model, optimizer, loader = prepare_training(accelerator)
    monitor = build_monitor(accelerator, model, measures=("cka",))
    train(accelerator, model, optimizer, loader, monitor, optimizer_steps=4)
    assert monitor.finish() is None
    assert [r.step for r in monitor.results] == [0, 2, 4]
    assert monitor.finish() is None  # a second call does nothing
    with pytest.raises(RuntimeError, match="after finish"):
        monitor.step()


def test_exception_in_loop_closes_without_capture(tmp_path):
    accelerator = make_accelerator(tmp_path)
    model, optimizer, loader = prepare_training(accelerator)
    with pytest.raises(KeyboardInterrupt), build_monitor(accelerator, model, measures=("cka",)) as monitor:
        train(accelerator, model, optimizer, loader, monitor, optimizer_steps=3)
        raise KeyboardInterrupt
    assert [r.step for r in monitor.results] == [0, 2]
    with pytest.raises(RuntimeError, match="after finish"):
        monitor.step()


def test_log_dir_without_tracker(tmp_path):
    accelerator = make_accelerator(tmp_path, log_with=None)
    model, optimizer, loader = prepare_training(accelerator)
    log_dir = tmp_path / "similarities"
    with build_monitor(accelerator, model, log_dir=log_dir) as monitor:
        train(accelerator, model, optimizer, loader, monitor, optimizer_steps=2)

    # Without a TensorBoard tracker the monitor writes its own event file, scalars included.
    events = load_events(log_dir)
    assert [e.step for e in events.Scalars("cka/vs_init/embeddings")] == [0, 2]
    assert "cka/cross_layer" in events.Tags()["images"]
    records = [json.loads(line) for line in (log_dir / "contrasim.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert not (tmp_path / "project").exists()


def test_no_tracker_and_no_log_dir_writes_nothing(tmp_path, caplog):
    accelerator = make_accelerator(tmp_path, log_with=None)
    model, optimizer, loader = prepare_training(accelerator)
    with caplog.at_level(logging.WARNING), build_monitor(accelerator, model, measures=("cka",)) as monitor:
        train(accelerator, model, optimizer, loader, monitor, optimizer_steps=1)
    assert "writes no files" in caplog.text
    assert monitor.log_dir is None
    assert [r.step for r in monitor.results] == [0, 1]
    assert list(tmp_path.rglob("*")) == []


def test_probe_set_and_dataset_accepted(tmp_path):
    accelerator = make_accelerator(tmp_path, log_with=None)
    model, _, _ = prepare_training(accelerator)
    examples = token_dataset(80, seed=2)
    from_list = SimilarityMonitor(accelerator, model, examples, measures=("cka",), collate_fn=pad_collate)
    from_probe_set = SimilarityMonitor(accelerator, model, ProbeSet(examples, pad_collate, 8), measures=("cka",))
    dataset = torch.utils.data.Subset(examples, list(range(80)))
    from_dataset = SimilarityMonitor(accelerator, model, dataset, measures=("cka",))
    for monitor in (from_probe_set, from_dataset):
        np.testing.assert_allclose(monitor.results[0].cross_layer["cka"], from_list.results[0].cross_layer["cka"])
        monitor.close()
    from_list.close()


BAD_ARGUMENTS = [
    ({"accelerator": None}, TypeError, "`accelerator`"),
    ({"model": "bert"}, TypeError, "`model`"),
    ({"probe": 64}, TypeError, "`probe`"),
    ({"probe": []}, ValueError, "`probe` is empty"),
    ({"probe": "input_ids"}, TypeError, "`probe`"),
    ({"probe": [[1, 2, 3]] * 80}, TypeError, "expected a mapping"),
    ({"probe": token_dataset(20)}, ValueError, "at least"),
    ({"schedule": 0}, ValueError, "`schedule`"),
    ({"schedule": "every 10"}, TypeError, "`schedule`"),
    ({"layers": ["bert.encoder.layer.9"]}, ValueError, "matches no module"),
    ({"layers": []}, ValueError, "`layers`"),
    ({"measures": ("cka", "svcca")}, ValueError, "`measures`"),
    ({"pooling": "max"}, ValueError, "`pooling`"),
    ({"contrasim": {"epochs": 5}}, TypeError, "`contrasim`"),
    ({"held_out_fraction": 1.5}, ValueError, "`held_out_fraction`"),
    ({"probe_batch_size": 0}, ValueError, "`probe_batch_size`"),
    ({"seed": "0"}, TypeError, "`seed`"),
    ({"collate_fn": "pad"}, TypeError, "`collate_fn`"),
    ({"log_dir": 3}, TypeError, "`log_dir`"),
    ({"probe": ProbeSet(token_dataset(80)), "probe_batch_size": 8}, ValueError, "`probe_batch_size` and `collate_fn`"),
]


@pytest.mark.parametrize(("arguments", "error", "message"), BAD_ARGUMENTS)
def test_bad_argument_raises_at_construction(tmp_path, arguments, error, message):
    accelerator = make_accelerator(tmp_path, log_with=None)
    model = tiny_bert()
    options = {
        "accelerator": accelerator,
        "model": model,
        "probe": token_dataset(80, seed=2),
        "contrasim": FAST_CONTRASIM,
        "collate_fn": pad_collate,
    }
    options.update(arguments)
    if "probe" in arguments and isinstance(arguments["probe"], ProbeSet) and "collate_fn" not in arguments:
        del options["collate_fn"]
    with pytest.raises(error, match=message):
        SimilarityMonitor(**options)
    assert remaining_hooks(model) == 0


def test_trackers_not_started_raises(tmp_path):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="init_trackers"):
        SimilarityMonitor(accelerator, tiny_bert(), token_dataset(80), contrasim=FAST_CONTRASIM, collate_fn=pad_collate)


def make_result(step: int, vs_previous: list[float] | None) -> CaptureResult:
    layers = ["a", "b", "c"]
    values = {} if vs_previous is None else {"cka": np.array(vs_previous)}
    return CaptureResult(
        step=step,
        layers=layers,
        cross_layer={"cka": np.eye(3)},
        vs_init={"cka": np.ones(3)},
        vs_previous=values,
        previous_step=None,
        history_steps=[step],
        vs_init_history={"cka": np.ones((3, 1))},
    )


def test_settling_steps_need_every_later_capture():
    results = [
        make_result(0, None),
        make_result(10, [0.97, 0.80, 0.99]),
        make_result(20, [0.90, 0.96, 0.99]),
        make_result(30, [0.96, 0.97, float("nan")]),
        make_result(40, [0.98, 0.99, 0.99]),
    ]
    settled = pretrain_gpt2_shakespeare.settling_steps(results, "cka", 0.95)
    # a dips below at step 20, b is above from 20 on, and c has a NaN at step 30.
    assert settled == {"a": 30, "b": 20, "c": 40}
    assert pretrain_gpt2_shakespeare.settling_steps(results, "cka", 0.985) == {"a": None, "b": 40, "c": 40}
    order = pretrain_gpt2_shakespeare.format_settling_order(results, "cka", 0.985)
    assert order == "cka >= 0.985 vs previous capture: b (40), c (40), not settled: a"


def test_pretrain_example_runs(tmp_path, capsys):
    output_dir = tmp_path / "gpt2"
    exit_code = pretrain_gpt2_shakespeare.main(
        ["--quick", "--output-dir", str(output_dir), "--steps", "4", "--schedule", "2", "--n-layer", "2"]
    )
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert "transformer.h.1" in printed
    assert "Order in which the layers settle" in printed
    assert "tensorboard --logdir" in printed

    (run_dir,) = list(output_dir.iterdir())
    records = [json.loads(line) for line in (run_dir / "contrasim.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["layers"] == ["embeddings", "transformer.h.0", "transformer.h.1"]
    events = load_events(run_dir, suffix="")
    assert "train/loss" in events.Tags()["scalars"]
    assert "cka/vs_previous/transformer.h.1" in events.Tags()["scalars"]
