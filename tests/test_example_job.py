"""The main job runs end to end on a few examples (the real MiniLM checkpoint and Shakespeare corpus)."""

from __future__ import annotations

import json
from pathlib import Path

from contrasim_monitor.examples import finetune_shakespeare
from contrasim_monitor.examples.shakespeare_data import GENRES, balanced_split, load_speeches


def test_speeches_have_all_genres():
    speeches = load_speeches()
    assert len(speeches) > 20000
    assert {s.genre for s in speeches} == set(GENRES)
    assert all(len(s.text.split()) >= 8 for s in speeches)
    assert not any("**" in s.text or s.text.startswith("_") for s in speeches[:2000])


def test_balanced_split_is_disjoint():
    speeches = load_speeches()
    train, evaluation = balanced_split(speeches, 5, 3, seed=1)
    assert len(train) == 30
    assert len(evaluation) == 18
    assert not {id(s) for s in train} & {id(s) for s in evaluation}


def test_finetune_job_quick(tmp_path, capsys):
    output_dir = tmp_path / "job"
    exit_code = finetune_shakespeare.main(
        [
            "--output-dir",
            str(output_dir),
            "--train-per-genre",
            "8",
            "--eval-per-genre",
            "12",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-length",
            "24",
            "--probe-size",
            "64",
            "--schedule",
            "3",
            "--contrasim-epochs",
            "2",
        ]
    )
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert "tensorboard --logdir" in printed
    assert "bert.encoder.layer.5" in printed

    (run_dir,) = list((output_dir / "runs").iterdir())
    records = [json.loads(line) for line in (Path(run_dir) / "contrasim.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert len(records[0]["layers"]) == 7
