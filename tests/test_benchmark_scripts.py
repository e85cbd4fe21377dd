"""Command lines of the benchmark scripts: argument checks, --help, and --quick runs end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_benchmark_protocols import BENCHMARKS, load_benchmark_module

layer_prediction = load_benchmark_module("layer_prediction")
multilingual = load_benchmark_module("multilingual")
image_caption = load_benchmark_module("image_caption")


def parse_error(parse_args, argv: list[str], capsys) -> str:
    """Run a script's parse_args, expect argparse to exit with status 2, and return its error output."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def run_script(name: str, arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        check=False,
    )


# Argument checks


def test_layer_prediction_rejects_too_few_seeds(capsys):
    error = parse_error(layer_prediction.parse_args, ["--seeds", "3"], capsys)
    assert "argument --seeds: expected an integer >= 4, got 3" in error


def test_layer_prediction_rejects_non_integer(capsys):
    error = parse_error(layer_prediction.parse_args, ["--max-steps", "many"], capsys)
    assert "argument --max-steps: expected an integer >= 1, got 'many'" in error


def test_layer_prediction_rejects_too_few_models(capsys):
    error = parse_error(layer_prediction.parse_args, ["--models", "a", "b", "--dataset", "wikitext"], capsys)
    assert "--models: expected at least 4 models" in error
    assert "got 2" in error


def test_layer_prediction_models_need_text(capsys):
    error = parse_error(layer_prediction.parse_args, ["--models", "a", "b", "c", "d"], capsys)
    assert "--models needs a text source" in error


def test_layer_prediction_text_file_must_exist(tmp_path, capsys):
    argv = ["--models", "a", "b", "c", "d", "--text-file", str(tmp_path / "none.txt")]
    argv += ["--test-text-file", str(tmp_path / "none.txt")]
    error = parse_error(layer_prediction.parse_args, argv, capsys)
    assert "--text-file: file not found" in error


def test_layer_prediction_rejects_large_fold(capsys):
    error = parse_error(layer_prediction.parse_args, ["--seeds", "5", "--fold-size", "4"], capsys)
    assert "--fold-size: expected at most 3 with 5 models" in error
    assert "got 4" in error


def test_layer_prediction_quick_keeps_explicit_options():
    args = layer_prediction.parse_args(["--quick", "--max-steps", "7"])
    assert args.max_steps == 7
    assert args.seeds == layer_prediction.QUICK_DEFAULTS["seeds"]


def test_layer_prediction_rejects_json_folder(tmp_path, capsys):
    error = parse_error(layer_prediction.parse_args, ["--json", str(tmp_path)], capsys)
    assert "argument --json: expected a file path, got the folder" in error


def test_multilingual_needs_model(capsys):
    error = parse_error(multilingual.parse_args, ["--xnli"], capsys)
    assert "--model is required" in error


def test_multilingual_needs_data(capsys):
    error = parse_error(multilingual.parse_args, ["--model", "m"], capsys)
    assert "pass both --train-file and --test-file, or --xnli" in error


def test_multilingual_rejects_small_group(capsys):
    error = parse_error(multilingual.parse_args, ["--quick", "--group-size", "2"], capsys)
    assert "argument --group-size: expected an integer >= 4, got 2" in error


def test_multilingual_quick_rejects_model(capsys):
    error = parse_error(multilingual.parse_args, ["--quick", "--model", "m"], capsys)
    assert "leave out --model" in error


def test_image_caption_lists_missing_options(capsys):
    error = parse_error(image_caption.parse_args, ["--text-model", "gpt2"], capsys)
    assert "missing --vision-model, --train-file, --test-file" in error


@pytest.mark.parametrize("module", [layer_prediction, multilingual, image_caption], ids=lambda m: m.__name__)
def test_help_shows_example(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert "example: python benchmarks/" in output
    assert "--json PATH" in output


# --quick end to end


@pytest.mark.parametrize(
    ("script", "keys"),
    [
        (
            "multilingual",
            [
                "contrasim_random",
                "contrasim_nearest",
                "contrasim_other_pairs_random",
                "contrasim_other_pairs_nearest",
                "linear_cka_random",
                "linear_cka_nearest",
                "linear_cka_unbiased_random",
                "linear_cka_unbiased_nearest",
            ],
        ),
        (
            "image_caption",
            [
                "contrasim_random",
                "contrasim_nearest",
                "linear_cka_random",
                "linear_cka_nearest",
                "linear_cka_unbiased_random",
                "linear_cka_unbiased_nearest",
            ],
        ),
    ],
)
def test_group_benchmark_quick_run(script, keys, tmp_path):
    output = tmp_path / "result.json"
    completed = run_script(script, ["--quick", "--threads", "1", "--json", str(output)], timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "PLUMBING CHECK, NOT A RESULT" in completed.stdout
    accuracies = json.loads(output.read_text())
    assert list(accuracies) == keys
    assert all(0.0 <= value <= 1.0 for value in accuracies.values())


def test_layer_prediction_quick_digits_run(tmp_path, monkeypatch, capsys):
    """The quick run in-process on the digits family, with 2-epoch models and 40 encoder steps, from a cold cache.

    The subprocess run of the whole --quick takes minutes; see test_layer_prediction_full_quick_run.
    """
    seed_models = load_benchmark_module("_seed_models")
    monkeypatch.setattr(layer_prediction, "DigitsFamily", lambda: seed_models.DigitsFamily(epochs=2))
    threads = torch.get_num_threads()
    output = tmp_path / "result.json"
    arguments = ["--quick", "--families", "digits", "--measures", "contrasim", "linear_cka", "--max-steps", "40"]
    arguments += ["--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--json", str(output)]
    try:
        assert layer_prediction.main(arguments) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "QUICK RUN" in printed
    assert "ContraSim encoder for unseen_seeds, trained on seeds [2, 3], scored on seeds [0, 1]" in printed
    accuracies = json.loads(output.read_text())
    assert list(accuracies) == [
        "contrasim_same_seeds",
        "contrasim_unseen_seeds",
        "linear_cka_same_seeds",
        "linear_cka_unseen_seeds",
    ]
    assert all(0.0 <= value <= 1.0 for value in accuracies.values())
    assert len(list((tmp_path / "cache").glob("digits_mlp-*/seed_3"))) == 1


@pytest.mark.skipif(
    os.environ.get("CONTRASIM_SLOW_TESTS") != "1", reason="takes minutes; set CONTRASIM_SLOW_TESTS=1 to run"
)
def test_layer_prediction_full_quick_run(tmp_path):
    output = tmp_path / "result.json"
    arguments = ["--quick", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--json", str(output)]
    completed = run_script("layer_prediction", arguments, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    accuracies = json.loads(output.read_text())
    assert "shakespeare_bert_small/contrasim_unseen_seeds" in accuracies
    assert "digits_mlp/pwcca_same_seeds" in accuracies


def test_scripts_import_from_other_folder(tmp_path):
    """The scripts find their helper modules when started from another working directory."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "image_caption.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert Path(completed.stdout.splitlines()[0]).name.startswith("usage: image_caption.py")
