"""The dashboards as TensorBoard serves them: a real `tensorboard` server on loopback reads a real Trainer run.

The run is written by ContraSimCallback through the Trainer's own TensorBoard writer. The test reads scalars, heatmap
images, the text summary and the custom-scalars layout back through the server's HTTP data routes, the way the
dashboard does, and checks them against `contrasim.jsonl`.
"""

from __future__ import annotations

import gc
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import pad_collate, tiny_bert, token_dataset
from transformers import Trainer, TrainingArguments

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.heatmap import render_heatmap
from contrasim_monitor.result import CaptureResult
from contrasim_monitor.sinks import TensorBoardSink

LAYERS = ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
MEASURES = ("contrasim", "cka")
SERVER_TIMEOUT_SECONDS = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(base_url: str, route: str, **query) -> bytes:
    url = f"{base_url}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def get_json(base_url: str, route: str, **query):
    return json.loads(get(base_url, route, **query))


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """A 4-step Trainer run that logs to TensorBoard, with the monitor writing through the Trainer's writer."""
    from contrasim_monitor.integrations.transformers import ContraSimCallback

    root = tmp_path_factory.mktemp("dashboard")
    callback = ContraSimCallback(
        probe=80, schedule=2, contrasim=ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5)
    )
    args = TrainingArguments(
        output_dir=str(root / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=token_dataset(128, seed=1),
        eval_dataset=token_dataset(96, seed=2),
        data_collator=pad_collate,
        callbacks=[callback],
    )
    trainer.train()
    log_dir = Path(callback.log_dir)
    records = [json.loads(line) for line in (log_dir / "contrasim.jsonl").read_text().splitlines()]
    return {"logdir": log_dir.parent, "run": log_dir.name, "records": records}


@pytest.fixture(scope="module")
def server(monitored_run):
    """Start `tensorboard` on 127.0.0.1 and a free port, wait until it has loaded the run, and stop it afterwards."""
    executable = Path(sys.executable).parent / "tensorboard"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "tensorboard.main"]
    port = free_port()
    command += [
        "--logdir",
        str(monitored_run["logdir"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # The Rust data server may be missing; the Python loader reads the files directly.
        "--load_fast=false",
        "--reload_interval",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"tensorboard exited with status {process.returncode}: {process.stdout.read()}")
            try:
                tags = get_json(base_url, "/data/plugin/scalars/tags")
                if "contrasim/vs_init/embeddings" in tags.get(monitored_run["run"], {}):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the run within {SERVER_TIMEOUT_SECONDS} s")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()


def test_scalars_equal_json_lines(monitored_run, server):
    run, records = monitored_run["run"], monitored_run["records"]
    tags = get_json(server, "/data/plugin/scalars/tags")[run]
    # The Trainer's own curves share the event file.
    assert "train/loss" in tags
    for measure in MEASURES:
        for comparison in ("vs_init", "vs_previous"):
            for index, layer in enumerate(LAYERS):
                tag = f"{measure}/{comparison}/{layer}"
                assert tag in tags, tag
                points = get_json(server, "/data/plugin/scalars/scalars", run=run, tag=tag)
                expected = [(r["step"], r[comparison][measure][index]) for r in records if comparison in r and
                            measure in r[comparison]]  # fmt: skip
                assert [step for _, step, _ in points] == [step for step, _ in expected]
                # TensorBoard keeps scalars in float32.
                np.testing.assert_allclose([v for _, _, v in points], [v for _, v in expected], rtol=1e-6)
    assert [r["step"] for r in records] == [0, 2, 4]


def test_heatmaps_decode_as_png(monitored_run, server):
    run, records = monitored_run["run"], monitored_run["records"]
    image_tags = get_json(server, "/data/plugin/images/tags")[run]
    for measure in MEASURES:
        for kind in ("cross_layer", "vs_init_history"):
            tag = f"{measure}/{kind}"
            assert tag in image_tags, tag
            entries = get_json(server, "/data/plugin/images/images", run=run, tag=tag, sample=0)
            assert [entry["step"] for entry in entries] == [r["step"] for r in records]
            payload = get(server, "/data/plugin/images/individualImage?" + entries[-1]["query"])
            assert payload[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
                assert image.mode == "RGB"
                assert image.width > 200
                assert image.height > 200
                # A heatmap, not a blank canvas: the colour scale spans many colours.
                assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_custom_scalars_layout_covers_every_layer(monitored_run, server):
    run = monitored_run["run"]
    layout = get_json(server, "/data/plugin/custom_scalars/layout")
    scalar_tags = list(get_json(server, "/data/plugin/scalars/tags")[run])
    categories = {category["title"]: category for category in layout["category"]}
    for measure in MEASURES:
        assert measure in categories
        charts = {chart["title"]: chart for chart in categories[measure]["chart"]}
        for comparison in ("vs_init", "vs_previous"):
            patterns = charts[comparison]["multiline"]["tag"]
            charted = [tag for tag in scalar_tags if any(re.search(pattern, tag) for pattern in patterns)]
            assert sorted(charted) == sorted(f"{measure}/{comparison}/{layer}" for layer in LAYERS)


def test_text_summary_per_capture(monitored_run, server):
    run, records = monitored_run["run"], monitored_run["records"]
    # SummaryWriter.add_text stores its text under "<tag>/text_summary".
    entries = get_json(server, "/data/plugin/text/text", run=run, tag="similarity/summary/text_summary")
    assert [entry["step"] for entry in entries] == [r["step"] for r in records]
    last = entries[-1]["text"]
    for layer in LAYERS:
        assert layer in last
    assert f"{records[-1]['vs_init']['cka'][-1]:.3f}" in last


def live_figures() -> int:
    from matplotlib.figure import Figure

    gc.collect()
    # type() rather than isinstance(): isinstance would call __getattr__ of lazily loaded modules, which warn.
    return sum(1 for item in gc.get_objects() if type(item) is Figure)


def test_heatmaps_leak_no_matplotlib_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = live_figures()
    matrix = np.random.default_rng(0).random((12, 12))
    labels = [f"encoder.layer.{i}" for i in range(12)]
    for _ in range(5):
        image = render_heatmap(matrix, labels, labels, "leak check", row_title="layer", column_title="layer")
    assert image.shape[2] == 3
    result = CaptureResult(
        step=3,
        layers=labels[:3],
        cross_layer={"cka": matrix[:3, :3]},
        vs_init={"cka": np.ones(3)},
        vs_previous={"cka": np.ones(3)},
        previous_step=1,
        history_steps=[0, 1, 3],
        vs_init_history={"cka": matrix[:3, :3]},
    )
    sink = TensorBoardSink(tmp_path, ("cka",))
    for _ in range(5):
        sink.write(result)
    sink.close()
    assert plt.get_fignums() == []
    assert live_figures() == before
