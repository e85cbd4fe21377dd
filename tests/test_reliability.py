"""Faults injected into real runs: activations that turn non-finite, a disk that fills up, files that carry
pickled code. Training must go on, and what was stored before the fault must stay readable."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contrasim_monitor.integrations.transformers import ContraSimCallback
from tb_events import load_events
from tiny_models import pad_collate, tiny_bert, token_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.store import SnapshotStore

FAST_CONTRASIM = ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=3)
FULL_DISK_JOB = Path(__file__).parent / "fault_jobs" / "full_disk_job.py"
PACKAGE_DIRS = [Path(__file__).parents[1] / "contrasim_monitor", Path(__file__).parents[1] / "integrations"]


class PoisonLayer(TrainerCallback):
    """From the end of optimizer step ``step`` on, make one block output NaN whenever the model is in eval mode.

    Training runs in train mode and never gets the NaN. The monitor's probe pass runs in eval mode and gets it,
    as it would if that layer's activations had diverged.
    """

    def __init__(self, model: torch.nn.Module, step: int) -> None:
        self.step = step
        self.active = False
        model.bert.encoder.layer[1].register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if self.active and not module.training:
            return (output[0] * math.nan, *output[1:]) if isinstance(output, tuple) else output * math.nan
        return None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.active = True


def test_nan_layer_logged_once_training_continues(tmp_path, caplog):
    model = tiny_bert()
    poison = PoisonLayer(model, step=2)
    callback = ContraSimCallback(
        probe=token_dataset(64, seed=2), schedule=1, contrasim=FAST_CONTRASIM, log_dir=tmp_path / "tb"
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=token_dataset(128, seed=1),
        data_collator=pad_collate,
        callbacks=[poison, callback],
    )
    with caplog.at_level(logging.WARNING, logger="contrasim_monitor"):
        trainer.train()

    assert trainer.state.global_step == 5
    records = [json.loads(line) for line in (tmp_path / "tb" / "contrasim.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1, 2, 3, 4, 5]
    for record in records:
        poisoned = record["step"] >= 2
        # Layers: embeddings, block 0, block 1 (poisoned), block 2 (reads block 1's output).
        for measure in ("cka", "contrasim"):
            values = record["vs_init"][measure]
            assert values[0] is not None
            assert values[1] is not None
            assert (values[2] is None) == poisoned, (record["step"], measure, values)
            assert (values[3] is None) == poisoned, (record["step"], measure, values)
        expected_unusable = ["bert.encoder.layer.1", "bert.encoder.layer.2"] if poisoned else []
        assert record["unusable_layers"] == expected_unusable

    warnings = [r.getMessage() for r in caplog.records if "non-finite activations" in r.getMessage()]
    # Four poisoned captures of two layers, reported once per layer.
    assert len(warnings) == 2
    assert any("'bert.encoder.layer.1'" in message for message in warnings)
    assert any("'bert.encoder.layer.2'" in message for message in warnings)

    events = load_events(tmp_path / "tb")
    poisoned_curve = events.Scalars("cka/vs_init/bert.encoder.layer.1")
    assert [event.step for event in poisoned_curve] == [0, 1, 2, 3, 4, 5]
    assert all(math.isnan(event.value) for event in poisoned_curve[2:])
    healthy_curve = events.Scalars("cka/vs_init/bert.encoder.layer.0")
    assert all(math.isfinite(event.value) for event in healthy_curve)


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("full_disk")
    completed = subprocess.run(
        [sys.executable, str(FULL_DISK_JOB), str(output_dir), "5"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))
    return {"report": report, "stderr": completed.stderr, "log_dir": Path(report["log_dir"])}


def test_full_disk_training_finishes(full_disk_run):
    report = full_disk_run["report"]
    assert report["global_step"] == 10
    assert report["monitor_enabled"] is False
    # Step 5 was computed but could not be written; no capture was attempted after that.
    assert report["result_steps"] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("sink", ["TensorBoardSink", "JsonLinesSink", "SnapshotSink"])
def test_full_disk_each_failure_reported_once(full_disk_run, sink):
    failures = re.findall(rf"Writing the capture at step \d+ with {sink} failed", full_disk_run["stderr"])
    assert len(failures) == 1


def test_full_disk_monitoring_stop_reported_once(full_disk_run):
    assert full_disk_run["stderr"].count("Every output of the similarity monitor has failed") == 1


def test_full_disk_keeps_earlier_jsonl_lines(full_disk_run):
    lines = (full_disk_run["log_dir"] / "contrasim.jsonl").read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == ""  # whole lines only: the failed record left no partial line
    assert [json.loads(line)["step"] for line in lines[:-1]] == [0, 1, 2, 3, 4]


def test_full_disk_keeps_earlier_snapshots(full_disk_run):
    store = SnapshotStore.open(full_disk_run["log_dir"] / "snapshots")
    assert store.steps() == [0, 1, 2, 3, 4]
    for step in store.steps():
        activations = store.load(step)
        assert all(tensor.shape == (64, 32) for tensor in activations.values())
    assert not list((full_disk_run["log_dir"] / "snapshots").glob("*.tmp*"))


def test_full_disk_keeps_earlier_events(full_disk_run):
    events = load_events(full_disk_run["log_dir"])
    steps = [event.step for event in events.Scalars("cka/vs_init/bert.encoder.layer.0")]
    assert steps == [0, 1, 2, 3, 4]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_store_never_unpickles_snapshot(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    store.write(0, {"layer": torch.randn(8, 4)}, fingerprint="probe")
    snapshot = next((tmp_path / "store").glob("*.safetensors"))
    marker = tmp_path / "code_ran"
    # A pickle in the place of the snapshot file, as a file from elsewhere might be.
    snapshot.write_bytes(pickle.dumps({"layer": _RunsCodeWhenUnpickled(marker)}))
    torch.save({"layer": _RunsCodeWhenUnpickled(marker)}, tmp_path / "store" / "extra.pt")
    reopened = SnapshotStore.open(tmp_path / "store")
    with pytest.raises(ValueError):
        reopened.load(0)
    assert not marker.exists()


def test_package_loads_no_pickles():
    """Every load in the package goes through safetensors, JSON, or torch.load with weights_only=True."""
    offenders = []
    for folder in PACKAGE_DIRS:
        for path in folder.rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                code = line.split("#", 1)[0]
                unsafe_torch_load = "torch.load(" in code and "weights_only=True" not in code
                if unsafe_torch_load or re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(", code):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
