"""Two real processes on the CPU (torchrun, gloo on loopback) for the Trainer callback and the Accelerate monitor.

Each job in ``tests/multiprocess`` trains a tiny BERT for 4 optimizer steps with captures at steps 0, 2 and 4 on a
probe set of 67 examples, so the two shares differ in size (34 and 33 rows). Each rank writes what its monitor
saw, and rank 0 saves the weights at each capture. The tests replay those captures in this single process on the
same weights and compare: two processes must give the numbers of one process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

JOBS_DIR = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(JOBS_DIR))

import job_common  # noqa: E402

from contrasim_monitor.monitor import Monitor  # noqa: E402
from contrasim_monitor.probe import ProbeSet  # noqa: E402
from contrasim_monitor.result import CaptureResult  # noqa: E402
from contrasim_monitor.tracker import SimilarityTracker  # noqa: E402

#: A hang (a collective that one rank never reaches) fails the test after this many seconds.
JOB_TIMEOUT_SECONDS = 240
TOLERANCE = 1e-5


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def launch_two_processes(script: str, output_dir: Path, *arguments: str) -> list[dict]:
    """Run ``script OUTPUT_DIR ARGUMENTS...`` under torchrun with two CPU processes and return both ranks' reports."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_loopback_port()),
        str(JOBS_DIR / script),
        str(output_dir),
        *arguments,
    ]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # keep gloo's traffic on loopback
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=JOB_TIMEOUT_SECONDS, env=environment, cwd=output_dir.parent
    )
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def replay_single_process(output_dir: Path, steps: list[int]) -> tuple[list[CaptureResult], dict]:
    """Capture the saved weights of each step in this process (no process group), as a one-process run would."""
    weights = torch.load(output_dir / "weights.pt")
    model = job_common.tiny_bert()
    tracker = SimilarityTracker(contrasim=job_common.FAST_CONTRASIM)
    monitor = Monitor(tracker)
    probe = ProbeSet(job_common.probe_examples(), job_common.pad_collate, job_common.PROBE_BATCH_SIZE)
    monitor.start(model, probe)
    activations = {}
    original_update = tracker.update

    def recording_update(step, captured, *args, **kwargs):
        activations[step] = {name: rows.clone() for name, rows in captured.items()}
        return original_update(step, captured, *args, **kwargs)

    tracker.update = recording_update
    for step in steps:
        model.load_state_dict(weights[step])
        monitor.capture(model, step, strict=True)
    return monitor.results, activations


def measure_values(record: dict, measure: str) -> dict[str, np.ndarray]:
    values = {
        "cross_layer": np.array(record["cross_layer"][measure], dtype=float),
        "vs_init": np.array(record["vs_init"][measure], dtype=float),
    }
    if measure in record["vs_previous"]:
        values["vs_previous"] = np.array(record["vs_previous"][measure], dtype=float)
    return values


def event_file_pids(folder: Path) -> set[int]:
    """Return the writer process ids in the names ``events.out.tfevents.<time>.<host>.<pid>.<n>[.suffix]``."""
    pids = set()
    for path in folder.rglob("events.out.tfevents.*"):
        match = re.match(r"events\.out\.tfevents\.\d+\.[^.]+\.(\d+)\.", path.name)
        assert match, f"unexpected event file name {path.name}"
        pids.add(int(match.group(1)))
    return pids


@pytest.fixture(scope="module", params=["trainer_job.py", "accelerate_job.py"])
def job(request, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp(request.param.removesuffix(".py")) / "run"
    output_dir.mkdir()
    reports = launch_two_processes(request.param, output_dir)
    replayed, replayed_activations = replay_single_process(output_dir, job_common.EXPECTED_STEPS)
    return {
        "name": request.param,
        "output_dir": output_dir,
        "reports": reports,
        "replayed": replayed,
        "replayed_activations": replayed_activations,
    }


def test_both_ranks_see_two_processes(job):
    for rank, report in enumerate(job["reports"]):
        assert report["rank"] == rank
        assert report["world_size"] == 2
    assert job["reports"][0]["pid"] != job["reports"][1]["pid"]


def test_captures_at_same_steps_on_both_ranks(job):
    for report in job["reports"]:
        assert report["steps"] == job_common.EXPECTED_STEPS
        assert report["layers"] == [
            "embeddings",
            "bert.encoder.layer.0",
            "bert.encoder.layer.1",
            "bert.encoder.layer.2",
        ]


def test_probe_split_into_shares(job):
    rank0, rank1 = job["reports"]
    captures = len(job_common.EXPECTED_STEPS)
    assert rank0["local_rows"] == [34] * captures
    assert rank1["local_rows"] == [33] * captures


def test_gathered_rows_cover_probe_once(job):
    for report in job["reports"]:
        for step in job_common.EXPECTED_STEPS:
            assert report["gathered_rows"][str(step)] == job_common.PROBE_SIZE


def test_gathered_activations_match_one_process(job):
    output_dir = job["output_dir"]
    rank0 = torch.load(output_dir / "rank0_activations.pt")
    rank1 = torch.load(output_dir / "rank1_activations.pt")
    for step in job_common.EXPECTED_STEPS:
        single = job["replayed_activations"][step]
        assert list(rank0[step]) == list(single)
        for layer, rows in single.items():
            assert rank0[step][layer].shape == (job_common.PROBE_SIZE, 32)
            # Both ranks gathered the same bytes, in the probe set's order.
            assert torch.equal(rank0[step][layer], rank1[step][layer]), (step, layer)
            torch.testing.assert_close(rank0[step][layer], rows, atol=TOLERANCE, rtol=0, msg=f"{step} {layer}")


# CKA is closed-form, so its tolerance only covers float differences in the activations. ContraSim trains its
# heads from a fixed seed on those activations, which can amplify such differences a little.
@pytest.mark.parametrize(("measure", "tolerance"), [("cka", TOLERANCE), ("contrasim", 1e-4)])
def test_similarities_match_one_process(job, measure, tolerance):
    replayed = [result.to_record() for result in job["replayed"]]
    for report in job["reports"]:
        for record, reference in zip(report["results"], replayed, strict=True):
            assert record["step"] == reference["step"]
            expected = measure_values(reference, measure)
            actual = measure_values(record, measure)
            assert list(actual) == list(expected)
            for comparison, values in expected.items():
                np.testing.assert_allclose(actual[comparison], values, atol=tolerance, rtol=0, err_msg=comparison)


def test_contrasim_equal_on_both_ranks(job):
    rank0, rank1 = job["reports"]
    for record0, record1 in zip(rank0["results"], rank1["results"], strict=True):
        for comparison, values in measure_values(record0, "contrasim").items():
            np.testing.assert_allclose(
                measure_values(record1, "contrasim")[comparison], values, atol=1e-6, rtol=0, err_msg=comparison
            )


def test_only_rank_zero_writes(job):
    output_dir = job["output_dir"]
    rank0, rank1 = job["reports"]
    pids = event_file_pids(output_dir)
    assert pids, f"no event files under {output_dir}"
    assert pids == {rank0["pid"]}
    (jsonl,) = list(output_dir.rglob("contrasim.jsonl"))
    steps = [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]
    assert steps == job_common.EXPECTED_STEPS


@pytest.fixture(scope="module")
def budget_job(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("budget_job") / "run"
    output_dir.mkdir()
    return launch_two_processes("budget_job.py", output_dir)


def test_budget_plan_agreed_by_both_ranks(budget_job):
    for report in budget_job:
        assert report["world_size"] == 2
        # Rank 1 can afford nothing, so step 1 is skipped on both ranks, even though rank 0 could afford it.
        assert report["planned"]["1"] is None
        # A final capture runs on both ranks, with the closed-form measures that every rank can afford.
        assert report["planned"]["2"] == ["cka"]
        assert report["steps"] == [0, 2, 3]


def test_heads_split_between_ranks(budget_job):
    rank0, rank1 = budget_job
    total = rank0["heads_at_full_capture"]
    # 4 layers: 6 cross-layer heads, 4 against the initial and 4 against the previous capture.
    assert total == 14
    assert rank0["heads_trained_at_full_capture"] == [7]
    assert rank1["heads_trained_at_full_capture"] == [7]


def test_split_heads_match_one_process(budget_job):
    for report in budget_job:
        np.testing.assert_allclose(report["split_scores"], report["single_process_scores"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(budget_job[0]["split_scores"], budget_job[1]["split_scores"])


@pytest.fixture(scope="module", params=["fsdp1", "fsdp2"])
def fsdp_job(request, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp(request.param) / "run"
    output_dir.mkdir()
    return launch_two_processes("fsdp_job.py", output_dir, request.param)


def test_fsdp_captures_whole_probe_on_each_rank(fsdp_job):
    for report in fsdp_job:
        assert report["world_size"] == 2
        assert report["steps"] == [0, 1]
        # Every forward pass is collective under FSDP, so each rank runs the whole probe set.
        assert set(report["rows"].values()) == {job_common.PROBE_SIZE}
    expected_wrapper = {"fsdp1": "FullyShardedDataParallel", "fsdp2": "FSDPBertForSequenceClassification"}
    assert fsdp_job[0]["wrapper"] == expected_wrapper[fsdp_job[0]["kind"]]


def test_fsdp_activations_match_unsharded_model(fsdp_job):
    for report in fsdp_job:
        assert report["max_difference_from_unsharded"] < TOLERANCE
        np.testing.assert_allclose(
            report["initial"]["cross_layer"]["cka"], report["unsharded_cka"], atol=TOLERANCE, rtol=0
        )


def test_fsdp_ranks_agree_after_training_step(fsdp_job):
    rank0, rank1 = fsdp_job
    assert rank0["after_step"] is not None
    for measure in ("cka", "contrasim"):
        values0 = measure_values(rank0["after_step"], measure)
        values1 = measure_values(rank1["after_step"], measure)
        for comparison, values in values0.items():
            np.testing.assert_allclose(values1[comparison], values, atol=1e-6, rtol=0, err_msg=comparison)
    # The training step changed the model, so the capture is not a copy of the initial one.
    assert min(rank0["after_step"]["vs_init"]["cka"]) < 1.0


@pytest.fixture(scope="module")
def edge_job(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("edge_job") / "run"
    output_dir.mkdir()
    return launch_two_processes("edge_job.py", output_dir)


def test_different_probe_sets_rejected_on_both_ranks(edge_job):
    for report in edge_job:
        assert report["different_probe_error"] is not None
        assert "different probe sets" in report["different_probe_error"]


def test_fewer_heads_than_processes(edge_job):
    rank0, rank1 = edge_job
    assert rank0["one_head_scores"] == rank1["one_head_scores"]
    assert 0.0 < rank0["one_head_scores"][0][1] <= 1.0


def test_output_failure_on_one_rank_stops_both(edge_job):
    for report in edge_job:
        # The capture at step 0 is written and fails, so monitoring stops on both ranks and nothing hangs.
        assert report["enabled"] is False
        assert report["after_failure"] == [False, False]
