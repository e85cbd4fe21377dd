"""SnapshotStore: round trips per dtype, retention, crash safety, resume, and argument validation."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from contrasim_monitor.store import INDEX_NAME, SnapshotStore, snapshot_file_name

FINGERPRINT = "a1" * 32
OTHER_FINGERPRINT = "b2" * 32
REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent


def make_activations(step: int, layers: int = 3, examples: int = 16, width: int = 8) -> dict[str, torch.Tensor]:
    """Return deterministic activations for ``step``, with dots in layer names as in module paths."""
    generator = torch.Generator().manual_seed(step)
    return {f"encoder.layer.{i}": torch.randn(examples, width, generator=generator) for i in range(layers)}


def stored_files(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.endswith(".safetensors"))


def temp_files(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.endswith(".tmp"))


# Round trips.


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "tolerance"),
    [
        ("float16", torch.float16, {"rtol": 2**-11, "atol": 2**-24}),
        ("bfloat16", torch.bfloat16, {"rtol": 2**-8, "atol": 0.0}),
        ("float32", torch.float32, {"rtol": 0.0, "atol": 0.0}),
    ],
)
def test_round_trip_each_dtype(tmp_path, dtype, torch_dtype, tolerance):
    store = SnapshotStore(tmp_path / "store", dtype=dtype)
    written = {step: make_activations(step) for step in (0, 7, 12)}
    for step, activations in written.items():
        store.write(step, activations, FINGERPRINT)

    reopened = SnapshotStore.open(tmp_path / "store")
    assert reopened.dtype == dtype
    assert reopened.steps() == [0, 7, 12]
    assert reopened.latest_step() == 12
    assert reopened.fingerprint == FINGERPRINT
    assert reopened.layers == list(written[0])
    for step, activations in written.items():
        loaded = reopened.load(step)
        assert list(loaded) == list(activations)
        for name, tensor in activations.items():
            assert loaded[name].dtype == torch.float32
            torch.testing.assert_close(loaded[name], tensor, **tolerance)
            # The stored values are exactly the float32 input rounded once to the storage dtype.
            assert torch.equal(loaded[name], tensor.to(torch_dtype).float())
        stored = reopened.load(step, dtype=None)
        assert all(tensor.dtype == torch_dtype for tensor in stored.values())
        assert reopened.layer_dtypes(step) == dict.fromkeys(activations, dtype)


def test_round_trip_file_layout(tmp_path):
    store = SnapshotStore(tmp_path, dtype="bfloat16")
    store.write(12, make_activations(12), FINGERPRINT)

    assert stored_files(tmp_path) == ["step_00000012.safetensors"]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["format_version"] == 1
    assert index["fingerprint"] == FINGERPRINT
    assert index["layers"] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert index["dtype"] == "bfloat16"
    [entry] = index["snapshots"]
    assert entry["step"] == 12
    assert entry["file"] == "step_00000012.safetensors"
    assert entry["bytes"] == (tmp_path / "step_00000012.safetensors").stat().st_size
    assert entry["layer_dtypes"] == dict.fromkeys(index["layers"], "bfloat16")

    from safetensors import safe_open

    with safe_open(os.fspath(tmp_path / "step_00000012.safetensors"), framework="pt") as snapshot:
        metadata = snapshot.metadata()
        assert sorted(snapshot.keys()) == index["layers"]
    assert metadata["step"] == "12"
    assert metadata["dtype"] == "bfloat16"
    assert metadata["fingerprint"] == FINGERPRINT


def test_snapshot_file_name_pads_to_eight_digits():
    assert snapshot_file_name(0) == "step_00000000.safetensors"
    assert snapshot_file_name(1234) == "step_00001234.safetensors"
    assert snapshot_file_name(123456789) == "step_123456789.safetensors"


def test_write_detaches_and_copies_inputs(tmp_path):
    store = SnapshotStore(tmp_path, dtype="float32")
    shared = torch.randn(8, 6, requires_grad=True)
    # Two layers that share memory, one of them a non-contiguous view: safetensors rejects both unless copied.
    activations = {"a": shared * 1, "b": (shared * 1).t().contiguous().t()}
    activations["c"] = activations["a"]
    store.write(0, activations, FINGERPRINT)
    loaded = store.load(0)
    for name, tensor in activations.items():
        assert torch.equal(loaded[name], tensor.detach())


def test_load_device_and_dtype(tmp_path):
    store = SnapshotStore(tmp_path, dtype="float32")
    activations = make_activations(0)
    store.write(0, activations, FINGERPRINT)
    loaded = store.load(0, device=torch.device("cpu"), dtype=torch.float64)
    for name, tensor in activations.items():
        assert loaded[name].dtype == torch.float64
        assert loaded[name].device.type == "cpu"
        assert torch.equal(loaded[name], tensor.double())


def test_load_unknown_step_raises(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(3, make_activations(3), FINGERPRINT)
    with pytest.raises(KeyError, match=r"No snapshot at step 4 .*Stored steps: \[3\]"):
        store.load(4)
    with pytest.raises(TypeError, match="`dtype`"):
        store.load(3, dtype=torch.int64)


# Float16 overflow.


def test_float16_overflow_falls_back_per_layer(tmp_path, caplog):
    store = SnapshotStore(tmp_path, dtype="float16")
    activations = make_activations(0)
    activations["encoder.layer.1"][2, 3] = 1.0e5  # beyond float16's maximum of 65504
    activations["encoder.layer.2"][0, 0] = float("inf")  # already infinite: float16 keeps it exactly
    with caplog.at_level(logging.WARNING, logger="contrasim_monitor.store"):
        store.write(0, activations, FINGERPRINT)
        store.write(1, activations, FINGERPRINT)

    expected_dtypes = {"encoder.layer.0": "float16", "encoder.layer.1": "float32", "encoder.layer.2": "float16"}
    assert store.layer_dtypes(0) == expected_dtypes
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["snapshots"][0]["layer_dtypes"] == expected_dtypes

    loaded = store.load(0)
    assert torch.equal(loaded["encoder.layer.1"], activations["encoder.layer.1"])
    assert torch.isfinite(loaded["encoder.layer.1"]).all()
    assert torch.isinf(loaded["encoder.layer.2"][0, 0])
    assert store.load(0, dtype=None)["encoder.layer.1"].dtype == torch.float32
    assert store.load(0, dtype=None)["encoder.layer.0"].dtype == torch.float16

    warnings = [record.getMessage() for record in caplog.records if "encoder.layer.1" in record.getMessage()]
    assert len(warnings) == 1
    assert "float32" in warnings[0]


def test_bfloat16_keeps_large_values(tmp_path):
    store = SnapshotStore(tmp_path, dtype="bfloat16")
    activations = make_activations(0)
    activations["encoder.layer.1"][2, 3] = 1.0e5
    store.write(0, activations, FINGERPRINT)
    assert store.layer_dtypes(0)["encoder.layer.1"] == "bfloat16"
    assert store.load(0)["encoder.layer.1"][2, 3] == pytest.approx(1.0e5, rel=2**-8)


# Write contract.


def test_steps_must_increase(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(5, make_activations(5), FINGERPRINT)
    with pytest.raises(ValueError, match="steps must increase: got step 5, .* contains step 5"):
        store.write(5, make_activations(5), FINGERPRINT)
    with pytest.raises(ValueError, match="got step 4"):
        store.write(4, make_activations(4), FINGERPRINT)
    assert store.steps() == [5]
    assert stored_files(tmp_path) == ["step_00000005.safetensors"]


def test_fingerprint_mismatch_raises(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(0, make_activations(0), FINGERPRINT)
    with pytest.raises(ValueError, match="probe sets differ") as error:
        store.write(1, make_activations(1), OTHER_FINGERPRINT)
    message = str(error.value)
    assert FINGERPRINT[:12] in message
    assert OTHER_FINGERPRINT[:12] in message
    assert store.steps() == [0]

    with pytest.raises(ValueError, match="probe sets differ"):
        SnapshotStore.open(tmp_path).check_fingerprint(OTHER_FINGERPRINT)
    store.check_fingerprint(FINGERPRINT)


def test_empty_store_accepts_any_fingerprint(tmp_path):
    store = SnapshotStore(tmp_path)
    store.check_fingerprint(OTHER_FINGERPRINT)
    assert store.fingerprint is None
    assert store.layers is None
    assert store.latest_step() is None


def test_layer_mismatch_raises(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(0, make_activations(0), FINGERPRINT)
    changed = make_activations(1)
    changed["head"] = changed.pop("encoder.layer.2")
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.2'\], unexpected \['head'\]"):
        store.write(1, changed, FINGERPRINT)
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.2'\], unexpected \[\]"):
        store.write(1, make_activations(1, layers=2), FINGERPRINT)

    # The same layers in another order are accepted, and load returns them in the order of the first write.
    reordered = dict(reversed(list(make_activations(1).items())))
    store.write(1, reordered, FINGERPRINT)
    assert list(store.load(1)) == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]


# Retention.


def write_steps(store: SnapshotStore, steps, **sizes) -> None:
    for step in steps:
        store.write(step, make_activations(step, **sizes), FINGERPRINT)


def test_retention_removes_closest_neighbours(tmp_path):
    store = SnapshotStore(tmp_path, max_snapshots=4)
    write_steps(store, [0, 10, 20, 30, 35])
    # Removing 30 leaves a gap 20..35 (15), smaller than removing 10 or 20 (gap 20 each).
    assert store.steps() == [0, 10, 20, 35]
    assert stored_files(tmp_path) == [snapshot_file_name(step) for step in (0, 10, 20, 35)]


def test_retention_tie_goes_to_older(tmp_path):
    store = SnapshotStore(tmp_path, max_snapshots=3)
    write_steps(store, [0, 10, 20, 30])
    # Removing 10 or 20 each leaves a gap of 20, so the older one goes.
    assert store.steps() == [0, 20, 30]


def test_retention_by_count_spaces_evenly(tmp_path):
    store = SnapshotStore(tmp_path, max_snapshots=5)
    write_steps(store, range(40), layers=1, examples=2, width=2)

    steps = store.steps()
    assert len(steps) == 5
    assert steps[0] == 0
    assert steps[-1] == 39
    assert steps == [0, 9, 21, 32, 39]
    ideal_gap = 39 / 4
    for earlier, later in zip(steps, steps[1:]):
        assert ideal_gap / 2 <= later - earlier <= 2 * ideal_gap
    assert stored_files(tmp_path) == [snapshot_file_name(step) for step in steps]
    assert SnapshotStore.open(tmp_path).steps() == steps


def test_retention_by_bytes(tmp_path):
    probe = SnapshotStore(tmp_path / "probe")
    probe.write(0, make_activations(0), FINGERPRINT)
    snapshot_bytes = probe.total_bytes()

    store = SnapshotStore(tmp_path / "store", max_bytes=int(4.5 * snapshot_bytes))
    write_steps(store, range(0, 200, 10))
    steps = store.steps()
    assert len(steps) == 4
    assert steps[0] == 0
    assert steps[-1] == 190
    assert store.total_bytes() <= store.max_bytes
    assert sum((tmp_path / "store" / name).stat().st_size for name in stored_files(tmp_path / "store")) == (
        store.total_bytes()
    )
    for earlier, later in zip(steps, steps[1:]):
        assert 190 / 3 / 2 <= later - earlier <= 2 * 190 / 3


def test_byte_limit_below_two_snapshots(tmp_path, caplog):
    store = SnapshotStore(tmp_path, max_bytes=1)
    with caplog.at_level(logging.WARNING, logger="contrasim_monitor.store"):
        write_steps(store, [0, 1, 2, 3])
    assert store.steps() == [0, 3]
    assert sum("max_bytes=1" in record.getMessage() for record in caplog.records) == 1


# Crash safety.


def test_crash_leftovers_ignored_and_cleaned(tmp_path, caplog):
    store = SnapshotStore(tmp_path)
    write_steps(store, [0, 10, 20])
    expected = {step: store.load(step) for step in store.steps()}
    # What a process killed mid-write leaves: a half-written snapshot and index under temporary names, and a
    # complete snapshot file that was renamed into place before the index listing it was written.
    (tmp_path / ".step_00000030.safetensors.4242.tmp").write_bytes(b"\x00" * 100)
    (tmp_path / ".index.json.4242.tmp").write_text('{"format_version": 1, "snaps')
    (tmp_path / "step_00000030.safetensors").write_bytes((tmp_path / "step_00000010.safetensors").read_bytes())
    (tmp_path / "notes.tmp").write_text("not the store's")

    with caplog.at_level(logging.WARNING, logger="contrasim_monitor.store"):
        reopened = SnapshotStore.open(tmp_path)
    assert reopened.steps() == [0, 10, 20]
    for step, activations in expected.items():
        loaded = reopened.load(step)
        for name in activations:
            assert torch.equal(loaded[name], activations[name])
    assert temp_files(tmp_path) == ["notes.tmp"]
    assert any("step_00000030.safetensors" in record.getMessage() for record in caplog.records)

    # The resumed run writes step 30 again, replacing the unlisted file.
    reopened.write(30, make_activations(30), FINGERPRINT)
    assert SnapshotStore.open(tmp_path).steps() == [0, 10, 20, 30]
    torch.testing.assert_close(reopened.load(30), make_activations(30), rtol=2**-11, atol=2**-24)


# Run as one subprocess by the crash tests. It imports torch once, then forks one writer process per store
# folder, so the writers do not each pay the seconds of a torch import. Each writer stores captures in a loop
# and prints "<stage> stored <step>" after each. A writer named after a write stage kills itself with SIGKILL
# at that stage of the write of `kill_step`. The "loop" writer runs until the test kills it.
CRASH_WRITERS = """
import os, signal, sys
sys.path.insert(0, {tests_dir!r})
from test_store import CRASH_SIZES, FINGERPRINT, make_activations
from contrasim_monitor import store as store_module

folder, kill_step, stages = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def emit(*words):
    # One write(2) call of less than PIPE_BUF bytes, so lines of concurrent writers never interleave.
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())


def run_writer(stage):
    current = {{"step": None}}

    def kill_if(condition):
        if condition and current["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace

    def replace(source, target):
        kill_if(stage == "before-snapshot-rename" and str(target).endswith(".safetensors"))
        kill_if(stage == "before-index-rename" and str(target).endswith("index.json"))
        real_replace(source, target)

    store_module.os.replace = replace
    real_delete = store_module.SnapshotStore._delete_files

    def delete_files(self, entries):
        kill_if(stage == "before-deleting-dropped" and entries)
        real_delete(self, entries)

    store_module.SnapshotStore._delete_files = delete_files
    store = store_module.SnapshotStore(os.path.join(folder, stage), dtype="float16", max_snapshots=4)
    step = 0
    while True:
        current["step"] = step
        store.write(step, make_activations(step, **CRASH_SIZES), FINGERPRINT)
        emit(stage, "stored", step)
        step += 1


children = {{}}
for stage in stages:
    pid = os.fork()
    if pid == 0:
        try:
            run_writer(stage)
        finally:
            os._exit(1)
    children[pid] = stage
    emit(stage, "started", pid)
for _ in stages:
    pid, status = os.wait()
    emit(children[pid], "exited", os.waitstatus_to_exitcode(status))
"""
CRASH_SIZES = {"layers": 4, "examples": 64, "width": 128}
KILL_STEP = 6  # with max_snapshots=4, retention drops a snapshot at every write from step 4 on
KILL_STAGES = ("before-snapshot-rename", "before-index-rename", "before-deleting-dropped")
needs_fork_and_sigkill = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs os.fork and SIGKILL (POSIX)"
)


@dataclass
class WriterRun:
    """What the crash tests check of one writer process: its store folder, pid, exit code and stored steps."""

    root: Path
    pid: int = 0
    exit_code: int | None = None
    stored_steps: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def killed_writers(tmp_path_factory) -> dict[str, WriterRun]:
    """Run the crash writers: one per write stage, and the "loop" writer, killed after four stored captures."""
    folder = tmp_path_factory.mktemp("crash")
    script = folder / "crash_writers.py"
    script.write_text(CRASH_WRITERS.format(tests_dir=os.fspath(TESTS_DIR)))
    python_path = os.pathsep.join([os.fspath(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    stages = [*KILL_STAGES, "loop"]
    runs = {stage: WriterRun(folder / stage) for stage in stages}
    process = subprocess.Popen(
        [sys.executable, os.fspath(script), os.fspath(folder), str(KILL_STEP), *stages],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=python_path),
    )
    try:
        for line in process.stdout:
            stage, event, value = line.split()
            run = runs[stage]
            if event == "started":
                run.pid = int(value)
            elif event == "exited":
                run.exit_code = int(value)
            else:
                run.stored_steps.append(int(value))
                if stage == "loop" and len(run.stored_steps) == 4:
                    time.sleep(0.013)  # lands at an arbitrary point of a later write
                    os.kill(run.pid, signal.SIGKILL)
                elif stage != "loop" and int(value) > KILL_STEP:
                    os.kill(run.pid, signal.SIGKILL)  # it missed its kill point, which the tests report
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for run in runs.values():
            if run.exit_code is None and run.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.pid, signal.SIGKILL)
    return runs


def check_store_intact(root: Path) -> SnapshotStore:
    """Assert that the store at ``root`` opens, contains no temp file, and every listed capture loads exactly."""
    store = SnapshotStore.open(root, max_snapshots=4)
    assert temp_files(root) == []
    steps = store.steps()
    assert steps
    assert steps == sorted(set(steps))
    assert steps[0] == 0
    for step in steps:
        loaded = store.load(step)
        for name, tensor in make_activations(step, **CRASH_SIZES).items():
            assert torch.equal(loaded[name], tensor.half().float())
    return store


@needs_fork_and_sigkill
@pytest.mark.parametrize("stage", [*KILL_STAGES, "loop"])
def test_crash_writer_killed(killed_writers, stage):
    run = killed_writers[stage]
    assert run.exit_code == -signal.SIGKILL
    if stage != "loop":
        assert run.stored_steps == list(range(KILL_STEP))


@needs_fork_and_sigkill
def test_killed_before_snapshot_rename(killed_writers):
    run = killed_writers["before-snapshot-rename"]
    assert temp_files(run.root) == [f".step_{KILL_STEP:08d}.safetensors.{run.pid}.tmp"]
    store = check_store_intact(run.root)
    assert store.latest_step() == KILL_STEP - 1
    assert len(store) == 4


@needs_fork_and_sigkill
def test_killed_before_index_rename(killed_writers):
    run = killed_writers["before-index-rename"]
    assert temp_files(run.root) == [f".index.json.{run.pid}.tmp"]
    assert (run.root / snapshot_file_name(KILL_STEP)).exists()
    store = check_store_intact(run.root)
    assert store.latest_step() == KILL_STEP - 1

    # A resumed run writes the lost step again, replacing the unlisted file, and retention continues.
    store.write(KILL_STEP, make_activations(KILL_STEP, **CRASH_SIZES), FINGERPRINT)
    store = check_store_intact(run.root)
    assert store.latest_step() == KILL_STEP
    assert len(store) == 4


@needs_fork_and_sigkill
def test_killed_before_deleting_dropped(killed_writers):
    run = killed_writers["before-deleting-dropped"]
    store = check_store_intact(run.root)
    # The index already lists the kill step, so only the file of the dropped snapshot is left, unlisted.
    assert store.latest_step() == KILL_STEP
    assert len(store) == 4
    assert len(stored_files(run.root)) == 5


@needs_fork_and_sigkill
def test_killed_during_write_loop(killed_writers):
    run = killed_writers["loop"]
    assert len(run.stored_steps) >= 4
    store = check_store_intact(run.root)
    # The newest capture the writer reported as stored is still there: retention always keeps the newest.
    assert store.latest_step() >= run.stored_steps[-1]
    assert len(store) <= 4

    resumed_step = store.latest_step() + 1
    store.write(resumed_step, make_activations(resumed_step, **CRASH_SIZES), FINGERPRINT)
    assert check_store_intact(run.root).latest_step() == resumed_step


# Resume and truncation.


def test_constructor_resumes_existing_store(tmp_path):
    write_steps(SnapshotStore(tmp_path, dtype="float32"), [0, 5])
    resumed = SnapshotStore(tmp_path, dtype="float32")
    assert resumed.steps() == [0, 5]
    assert resumed.fingerprint == FINGERPRINT
    resumed.write(9, make_activations(9), FINGERPRINT)
    assert SnapshotStore.open(tmp_path).steps() == [0, 5, 9]
    with pytest.raises(ValueError, match=r"stores float32, but `dtype` is 'float16'"):
        SnapshotStore(tmp_path, dtype="float16")


def test_truncate_after(tmp_path):
    store = SnapshotStore(tmp_path)
    write_steps(store, [0, 10, 20, 30])
    assert store.truncate_after(15) == [20, 30]
    assert store.steps() == [0, 10]
    assert stored_files(tmp_path) == [snapshot_file_name(0), snapshot_file_name(10)]
    assert SnapshotStore.open(tmp_path).steps() == [0, 10]

    # The series continues past the truncation point without the abandoned steps.
    store.write(20, make_activations(20), FINGERPRINT)
    assert SnapshotStore.open(tmp_path).steps() == [0, 10, 20]
    torch.testing.assert_close(store.load(20), make_activations(20), rtol=2**-11, atol=2**-24)
    assert store.truncate_after(20) == []

    assert store.truncate_after(-1) == [0, 10, 20]
    assert store.steps() == []
    assert stored_files(tmp_path) == []
    # The probe set and layers stay fixed for the store.
    assert SnapshotStore.open(tmp_path).fingerprint == FINGERPRINT
    with pytest.raises(ValueError, match="probe sets differ"):
        store.write(0, make_activations(0), OTHER_FINGERPRINT)


# Never unpickle.


class _WritesMarkerWhenUnpickled:
    """Creates a file when unpickled, as a malicious pickle would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_load_never_unpickles(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    write_steps(store, [0, 1])
    marker = tmp_path / "marker"
    (tmp_path / "store" / snapshot_file_name(0)).write_bytes(pickle.dumps(_WritesMarkerWhenUnpickled(marker)))
    torch.save({"encoder.layer.0": torch.ones(2)}, tmp_path / "store" / snapshot_file_name(1))

    for step in (0, 1):
        with pytest.raises(ValueError, match="not a valid safetensors file.*never unpickles"):
            store.load(step)
    assert not marker.exists()


def test_load_rejects_file_of_another_step(tmp_path):
    store = SnapshotStore(tmp_path)
    write_steps(store, [0, 1])
    (tmp_path / snapshot_file_name(1)).write_bytes((tmp_path / snapshot_file_name(0)).read_bytes())
    with pytest.raises(ValueError, match="metadata has step '0', the index 1"):
        store.load(1)


def test_load_missing_file_raises(tmp_path):
    store = SnapshotStore(tmp_path)
    write_steps(store, [0])
    (tmp_path / snapshot_file_name(0)).unlink()
    with pytest.raises(FileNotFoundError, match="listed in index.json but missing"):
        store.load(0)


# Opening and validation.


def test_open_without_index_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="No snapshot store .*index.json is missing"):
        SnapshotStore.open(tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()


def test_open_rejects_invalid_index(tmp_path):
    SnapshotStore(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid snapshot index"):
        SnapshotStore.open(tmp_path)

    index = {"format_version": 2, "fingerprint": None, "layers": None, "dtype": "float16", "snapshots": []}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="format version 2"):
        SnapshotStore.open(tmp_path)

    # An entry may only name its own snapshot file, because retention deletes the files that entries name.
    entry = {"step": 0, "file": "../elsewhere.txt", "bytes": 1, "layer_dtypes": {"a": "float16"}}
    index = {"format_version": 1, "fingerprint": FINGERPRINT, "layers": ["a"], "dtype": "float16", "snapshots": [entry]}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names file '../elsewhere.txt'"):
        SnapshotStore.open(tmp_path)


@pytest.mark.parametrize(
    ("arguments", "error", "pattern"),
    [
        (
            {"dtype": "float64"},
            ValueError,
            r"`dtype` must be one of \['float16', 'bfloat16', 'float32'\], got 'float64'",
        ),
        ({"dtype": torch.float64}, ValueError, "`dtype` must be one of"),
        ({"dtype": 16}, TypeError, "`dtype` must be a string .* got int"),
        ({"max_snapshots": 1}, ValueError, "`max_snapshots` must be at least 2, got 1"),
        ({"max_snapshots": 2.5}, TypeError, "`max_snapshots` must be an integer or None, got float"),
        ({"max_snapshots": True}, TypeError, "`max_snapshots` must be an integer or None, got True"),
        ({"max_bytes": 0}, ValueError, "`max_bytes` must be at least 1, got 0"),
        ({"max_bytes": "1GB"}, TypeError, "`max_bytes` must be an integer or None, got str"),
    ],
)
def test_constructor_validation(tmp_path, arguments, error, pattern):
    with pytest.raises(error, match=pattern):
        SnapshotStore(tmp_path / "store", **arguments)
    assert not (tmp_path / "store").exists()


def test_constructor_validates_root(tmp_path):
    with pytest.raises(TypeError, match="`root` must be a folder path"):
        SnapshotStore(42)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="`root` must be a folder, but .*a_file' exists"):
        SnapshotStore(a_file)


def test_torch_dtype_and_parent_folders(tmp_path):
    store = SnapshotStore(tmp_path / "runs" / "store", dtype=torch.bfloat16, max_snapshots=2, max_bytes=10**9)
    assert store.dtype == "bfloat16"
    assert (tmp_path / "runs" / "store" / INDEX_NAME).is_file()
    assert SnapshotStore.open(tmp_path / "runs" / "store").steps() == []


@pytest.mark.parametrize(
    ("step", "activations", "fingerprint", "error", "pattern"),
    [
        (-1, make_activations(0), FINGERPRINT, ValueError, "`step` must be a non-negative"),
        (True, make_activations(0), FINGERPRINT, TypeError, "`step` must be an integer, got True"),
        (1.0, make_activations(0), FINGERPRINT, TypeError, "`step` must be an integer, got float"),
        (0, make_activations(0), "", ValueError, "`fingerprint` is an empty string"),
        (0, make_activations(0), None, TypeError, "`fingerprint` must be a string"),
        (0, {}, FINGERPRINT, ValueError, "`activations` is empty"),
        (0, [torch.ones(2, 2)], FINGERPRINT, TypeError, "`activations` must be a mapping"),
        (0, {"a": [[1.0]]}, FINGERPRINT, TypeError, r"`activations\['a'\]` must be a torch.Tensor"),
        (0, {"a": torch.ones(2, 2, dtype=torch.int64)}, FINGERPRINT, TypeError, "must be floating point"),
        (0, {"a": torch.ones(4)}, FINGERPRINT, ValueError, r"must have shape \(N, D\).*got \(4,\)"),
        (0, {"a": torch.ones(4, 2), "b": torch.ones(3, 2)}, FINGERPRINT, ValueError, "has 3 rows"),
        (0, {"": torch.ones(2, 2)}, FINGERPRINT, TypeError, "non-empty strings"),
        (0, {"__metadata__": torch.ones(2, 2)}, FINGERPRINT, ValueError, "reserved by the safetensors format"),
    ],
)
def test_write_validation(tmp_path, step, activations, fingerprint, error, pattern):
    store = SnapshotStore(tmp_path)
    with pytest.raises(error, match=pattern):
        store.write(step, activations, fingerprint)
    assert store.steps() == []
    assert stored_files(tmp_path) == []
