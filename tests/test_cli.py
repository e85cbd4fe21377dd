"""The `contrasim-monitor` command line on a real Trainer run, its checkpoints and saved tiny models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_measures import linear_cka as reference_cka
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import pad_collate, tiny_bert
from transformers import BertTokenizer, GPT2Config, GPT2Model, Trainer, TrainingArguments

from contrasim_monitor.cli import EXIT_DRIFT, EXIT_INVALID_INPUT, EXIT_OK, main
from contrasim_monitor.compare import paired_layers
from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.report import settling_steps
from contrasim_monitor.store import SnapshotStore

WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
WORDS += ["the", "of", "and", "to", "in", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at"]
WORDS += ["by", "had", "are", "but", "from", "or", "not"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LAYERS = ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
FAST = ["--contrasim-epochs", "3", "--quiet"]


def write_tokenizer(folder: Path, words: list[str]) -> BertTokenizer:
    """Build and save a word-level BERT tokenizer of 64 entries, the vocabulary size of `tiny_bert`."""
    vocabulary = SPECIAL + words
    assert len(vocabulary) == 64
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(vocabulary)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(count)]


def tokenized(tokenizer, texts: list[str]) -> list[dict]:
    encoded = tokenizer(texts)
    return [
        {key: encoded[key][i] for key in encoded} | {"labels": int("the" in text.split())}
        for i, text in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A monitored Trainer run with checkpoints at steps 4 and 8, and saved model folders beside it."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = write_tokenizer(root / "tokenizer", WORDS)
    probe_texts = make_texts(80, seed=3)
    assert 1 not in tokenizer(probe_texts[0])["input_ids"], "every probe word must be in the vocabulary"
    (root / "probe.txt").write_text("\n".join(probe_texts) + "\n", encoding="utf-8")
    callback_module = pytest.importorskip("contrasim_monitor.integrations.transformers")
    callback = callback_module.ContraSimCallback(
        probe=tokenized(tokenizer, probe_texts),
        schedule=2,
        log_dir=root / "tb",
        contrasim=ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5),
    )
    args = TrainingArguments(
        output_dir=str(root / "out"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=tokenized(tokenizer, make_texts(128, seed=1)),
        eval_dataset=tokenized(tokenizer, make_texts(96, seed=2)),
        data_collator=pad_collate,
        callbacks=[callback],
        processing_class=tokenizer,
    )
    trainer.train()

    # The monitor keeps its probe set with the store, for comparisons of saved models.
    store = SnapshotStore.open(root / "tb" / "snapshots")
    assert store.read_probe()["fingerprint"] == callback.monitor.probe.fingerprint()

    # A model of the same architecture with other weights, saved with the run's tokenizer.
    other = tiny_bert(seed=1)
    other.save_pretrained(root / "other_bert")
    tokenizer.save_pretrained(root / "other_bert")
    # The same architecture under a tokenizer whose vocabulary is in another order.
    other.save_pretrained(root / "shuffled_vocabulary")
    write_tokenizer(root / "shuffled_tokenizer", WORDS[::-1]).save_pretrained(root / "shuffled_vocabulary")
    # Another architecture: GPT-2 has no modules named like BERT's.
    torch.manual_seed(0)
    GPT2Model(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(root / "gpt2")
    return root


def run_cli(capsys, *arguments) -> tuple[int, str, str]:
    code = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_events(log_dir: Path) -> EventAccumulator:
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    accumulator = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


# Help and usage.


def test_help_shows_examples_and_exit_codes(capsys):
    for arguments in ([], ["compare"], ["report"]):
        code, out, _ = run_cli(capsys, *arguments, "--help")
        assert code == EXIT_OK
        assert "examples:" in out
        assert "contrasim-monitor" in out
        assert "exit status:" in out
        assert "2  invalid usage or input" in out


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "compare", "only-one-folder")
    assert code == EXIT_INVALID_INPUT
    assert "required" in err
    code, _, err = run_cli(capsys, "report", "x", "--tolerance", "abc")
    assert code == EXIT_INVALID_INPUT


# compare: results.


def test_checkpoint_matches_store_at_same_step(run, capsys, tmp_path):
    out = tmp_path / "cmp"
    code, printed, err = run_cli(
        capsys, "compare", run / "out" / "checkpoint-8", run / "tb", "--step-b", 8, "--out", out, *FAST
    )
    assert code == EXIT_OK, err
    assert "Each layer of A against the layer of B with the same name" in printed
    assert err == ""

    document = json.loads((out / "compare.json").read_text())
    assert document["a"]["kind"] == "model"
    assert document["a"]["step"] == 8
    assert document["b"]["kind"] == "store"
    assert document["a"]["layers"] == LAYERS
    assert document["b"]["layers"] == LAYERS
    assert document["a"]["fingerprint"] == document["b"]["fingerprint"]
    assert document["probe"]["examples"] == 80
    cka = np.array(document["measures"]["cka"])
    contrasim = np.array(document["measures"]["contrasim"])
    assert cka.shape == (4, 4)
    assert contrasim.shape == (4, 4)
    # The checkpoint captured here and the stored float16 capture of the same step are the same representation.
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-4)
    assert np.all(np.isfinite(contrasim))

    with open(out / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 16
    for row in rows:
        i, j = LAYERS.index(row["layer_a"]), LAYERS.index(row["layer_b"])
        assert float(row["value"]) == pytest.approx(document["measures"][row["measure"]][i][j], abs=1e-6)
    for measure in ("contrasim", "cka"):
        with Image.open(out / f"compare_{measure}.png") as image:
            image.load()
            assert image.width > 200
            assert image.height > 200


def test_store_steps_match_reference_cka(run, capsys, tmp_path):
    out = tmp_path / "cmp"
    code, _, err = run_cli(
        capsys, "compare", run / "tb", run / "tb", "--step-a", 0, "--measures", "cka,procrustes", "--out", out, *FAST
    )
    assert code == EXIT_OK, err
    document = json.loads((out / "compare.json").read_text())
    assert document["a"]["step"] == 0
    assert document["b"]["step"] == 8
    store = SnapshotStore.open(run / "tb" / "snapshots")
    first, last = store.load(0, dtype=torch.float64), store.load(8, dtype=torch.float64)
    expected = np.array([[reference_cka(first[a].numpy(), last[b].numpy()) for b in LAYERS] for a in LAYERS])
    np.testing.assert_allclose(np.array(document["measures"]["cka"]), expected, atol=1e-9)
    procrustes = np.array(document["measures"]["procrustes"])
    assert np.all((procrustes >= 0) & (procrustes <= 1 + 1e-9))


def test_text_and_json_lines_probes_agree(run, capsys, tmp_path):
    texts = (run / "probe.txt").read_text().splitlines()
    json_lines = tmp_path / "probe.jsonl"
    json_lines.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    results = []
    for probe in (run / "probe.txt", json_lines):
        out = tmp_path / probe.suffix.strip(".")
        code, _, err = run_cli(
            capsys, "compare", run / "out" / "checkpoint-4", run / "other_bert", "--probe", probe, "--out", out,
            "--measures", "cka", *FAST,
        )  # fmt: skip
        assert code == EXIT_OK, err
        results.append(json.loads((out / "compare.json").read_text()))
    assert results[0]["measures"] == results[1]["measures"]
    assert results[0]["a"]["fingerprint"] == results[0]["b"]["fingerprint"]
    # The text probe tokenizes to the run's probe set, so it matches the store's fingerprint too.
    store = SnapshotStore.open(run / "tb" / "snapshots")
    assert results[0]["a"]["fingerprint"] == store.fingerprint


def test_different_architecture_with_text_probe(run, capsys, tmp_path):
    code, printed, err = run_cli(
        capsys, "compare", run / "other_bert", run / "gpt2", "--probe", run / "probe.txt", "--tokenizer",
        run / "tokenizer", "--measures", "cka", *FAST,
    )  # fmt: skip
    assert code == EXIT_OK, err
    assert "embeddings" in printed
    assert "h.1" in printed


def test_layers_pair_by_name_then_position():
    assert paired_layers(["x", "y"], ["y", "x", "z"]) == ("name", [(0, 1), (1, 0)])
    classifier = ["embeddings", "bert.encoder.layer.0"]
    assert paired_layers(["embeddings", "encoder.layer.0"], classifier) == ("position", [(0, 0), (1, 1)])
    assert paired_layers(["embeddings", "h.0", "h.1"], classifier) == ("name", [(0, 0)])


def test_compare_writes_tensorboard_events(run, capsys, tmp_path):
    out, events_dir = tmp_path / "cmp", tmp_path / "events"
    code, _, err = run_cli(
        capsys, "compare", run / "tb", run / "tb", "--step-a", 4, "--measures", "cka", "--out", out,
        "--tensorboard", events_dir, *FAST,
    )  # fmt: skip
    assert code == EXIT_OK, err
    document = json.loads((out / "compare.json").read_text())
    events = read_events(events_dir)
    tags = events.Tags()
    for index, layer in enumerate(LAYERS):
        [event] = events.Scalars(f"compare/cka/{layer}")
        assert event.step == 4
        assert event.value == pytest.approx(document["measures"]["cka"][index][index], abs=1e-6)
    assert "compare/cka" in tags["images"]
    assert events.Images("compare/cka")[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compare/summary/text_summary" in tags["tensors"]


# compare: errors.


def test_missing_folder(run, capsys):
    code, _, err = run_cli(capsys, "compare", run / "no-such-run", run / "tb", *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "A: folder" in err
    assert "not found" in err


def test_folder_that_is_no_run(run, capsys):
    code, _, err = run_cli(capsys, "compare", run / "tokenizer", run / "tb", *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "neither a snapshot store" in err


def test_empty_probe_file(run, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run_cli(capsys, "compare", run / "other_bert", run / "tb", "--probe", empty, *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "contains no examples" in err


def test_invalid_json_lines_probe(run, capsys, tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "a b"}\n{"oops": 1}\n')
    code, _, err = run_cli(capsys, "compare", run / "other_bert", run / "tb", "--probe", probe, *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "line 2" in err


def test_probe_differs_from_stored_fingerprint(run, capsys):
    # Truncated to 4 tokens, the run's own texts are no longer the stored probe set.
    code, _, err = run_cli(
        capsys, "compare", run / "other_bert", run / "tb", "--probe", run / "probe.txt", "--max-length", 4, *FAST
    )
    assert code == EXIT_INVALID_INPUT
    assert "The probe sets differ" in err
    assert "Example 0 differs in" in err


def test_stores_with_different_probe_sets(run, capsys, tmp_path):
    original = SnapshotStore.open(run / "tb" / "snapshots")
    other = SnapshotStore(tmp_path / "other_store", dtype="float32")
    other.write(0, original.load(8), fingerprint="0" * 64)
    code, _, err = run_cli(capsys, "compare", run / "tb", tmp_path / "other_store", *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "The probe sets differ" in err


def test_store_layers_missing_from_model(run, capsys):
    code, _, err = run_cli(capsys, "compare", run / "gpt2", run / "tb", "--measures", "cka", *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "Architectures do not match" in err
    assert "--layers-a" in err


def test_token_ids_under_different_tokenizers(run, capsys):
    # The stored probe set is token ids; under a reordered vocabulary they would be other words.
    code, _, err = run_cli(
        capsys, "compare", run / "out" / "checkpoint-4", run / "shuffled_vocabulary", "--measures", "cka", *FAST
    )
    assert code == EXIT_INVALID_INPUT
    assert "different tokenizers" in err


def test_token_ids_beyond_vocabulary(run, capsys, tmp_path):
    probe = tmp_path / "ids.jsonl"
    probe.write_text("".join(json.dumps({"input_ids": [2, 500 + i, 3]}) + "\n" for i in range(80)))
    code, _, err = run_cli(capsys, "compare", run / "other_bert", run / "gpt2", "--probe", probe, *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "vocabulary of 64" in err


def test_probe_too_small_for_contrasim(run, capsys, tmp_path):
    probe = tmp_path / "short.txt"
    probe.write_text("\n".join(make_texts(20, seed=9)) + "\n")
    arguments = ("compare", run / "other_bert", run / "out" / "checkpoint-4", "--probe", probe, *FAST)
    code, _, err = run_cli(capsys, *arguments)
    assert code == EXIT_INVALID_INPUT
    assert "--measures cka" in err
    code, _, err = run_cli(capsys, *arguments, "--measures", "cka")
    assert code == EXIT_OK, err


def test_existing_outputs_need_overwrite(run, capsys, tmp_path):
    out = tmp_path / "cmp"
    arguments = ("compare", run / "tb", run / "tb", "--step-a", 0, "--measures", "cka", "--out", out, *FAST)
    assert run_cli(capsys, *arguments)[0] == EXIT_OK
    (out / "compare.json").write_text("kept")
    (out / "notes.txt").write_text("the user's own file")

    code, _, err = run_cli(capsys, *arguments)
    assert code == EXIT_INVALID_INPUT
    assert "--overwrite" in err
    assert (out / "compare.json").read_text() == "kept"

    code, _, err = run_cli(capsys, *arguments, "--overwrite")
    assert code == EXIT_OK, err
    assert json.loads((out / "compare.json").read_text())["b"]["step"] == 8
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_out_that_is_a_file(run, capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run_cli(capsys, "compare", run / "tb", run / "tb", "--out", target, *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "is a file" in err


# report.


def test_report_matches_stored_results(run, capsys, tmp_path):
    out = tmp_path / "report"
    code, printed, err = run_cli(capsys, "report", run / "tb", "--out", out, *FAST)
    assert code == EXIT_OK, err
    assert "Order in which the layers settle" in printed
    document = json.loads((out / "report.json").read_text())
    assert document["steps"] == [0, 2, 4, 6, 8]
    assert document["drop_sources"] == {"cka": "contrasim.jsonl", "contrasim": "contrasim.jsonl"}
    records = [json.loads(line) for line in (run / "tb" / "contrasim.jsonl").read_text().splitlines()]

    # Final matrices are those of the last record.
    for measure in ("cka", "contrasim"):
        np.testing.assert_allclose(
            np.array(document["final_matrices"][measure], dtype=float),
            np.array(records[-1]["cross_layer"][measure], dtype=float),
        )
    # Largest drops are the lowest vs_previous values of the records.
    for index, entry in enumerate(document["layers"]):
        for measure in ("cka", "contrasim"):
            values = [record["vs_previous"][measure][index] for record in records[1:]]
            assert entry[measure]["largest_drop"] == pytest.approx(1 - min(values), abs=1e-12)
            assert entry[measure]["largest_drop_step"] == records[1 + int(np.argmin(values))]["step"]

    # Settling steps follow from CKA to the final capture, recomputed here in float64.
    store = SnapshotStore.open(run / "tb" / "snapshots")
    final = store.load(8, dtype=torch.float64)
    for index, layer in enumerate(LAYERS):
        similarity = [reference_cka(store.load(s, dtype=torch.float64)[layer].numpy(), final[layer].numpy()) for s in
                      store.steps()]  # fmt: skip
        entry = document["layers"][index]["cka"]
        np.testing.assert_allclose(entry["similarity_to_final"], similarity, atol=1e-9)
        settled = [s for k, s in enumerate(store.steps()) if all(v >= 0.95 for v in similarity[k:])][0]
        assert entry["settling_step"] == settled

    assert (out / "report.txt").read_text().startswith("Run: ")
    for name in ("report_final_cka.png", "report_settling_cka.png", "report_final_contrasim.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.width > 200


def test_report_without_records_uses_snapshots(run, capsys, tmp_path):
    shutil.copytree(run / "tb" / "snapshots", tmp_path / "store")
    code, _, err = run_cli(capsys, "report", tmp_path / "store", "--measures", "cka", "--out", tmp_path / "r", *FAST)
    assert code == EXIT_OK, err
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    assert document["drop_sources"] == {"cka": "snapshots"}
    assert document["final_sources"] == {"cka": "snapshots"}
    store = SnapshotStore.open(tmp_path / "store")
    snapshots = [store.load(step, dtype=torch.float64) for step in store.steps()]
    for index, layer in enumerate(LAYERS):
        to_previous = [reference_cka(a[layer].numpy(), b[layer].numpy()) for a, b in zip(snapshots, snapshots[1:])]
        assert document["layers"][index]["cka"]["largest_drop"] == pytest.approx(1 - min(to_previous), abs=1e-9)


def test_report_with_captures_lacking_contrasim(run, capsys, tmp_path):
    # Under a cost budget the monitor takes some captures with closed-form measures only.
    shutil.copytree(run / "tb", tmp_path / "tb")
    records = [json.loads(line) for line in (run / "tb" / "contrasim.jsonl").read_text().splitlines()]
    for record in records[:2] + records[-1:]:
        for field in ("cross_layer", "vs_init", "vs_previous"):
            record[field].pop("contrasim", None)
    (tmp_path / "tb" / "contrasim.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    code, _, err = run_cli(capsys, "report", tmp_path / "tb", "--out", tmp_path / "r", *FAST)
    assert code == EXIT_OK, err
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    assert document["drop_sources"]["contrasim"] == "contrasim.jsonl"
    assert document["final_sources"] == {"cka": "contrasim.jsonl", "contrasim": "snapshots"}
    final = np.array(document["final_matrices"]["contrasim"], dtype=float)
    np.testing.assert_allclose(np.diag(final), 1.0)
    np.testing.assert_allclose(final, final.T)
    for index, entry in enumerate(document["layers"]):
        values = [record["vs_previous"]["contrasim"][index] for record in records[2:-1]]
        assert entry["contrasim"]["largest_drop"] == pytest.approx(1 - min(values), abs=1e-12)


def test_report_drift_alarm_exit_code(run, capsys):
    arguments = ("report", run / "tb", "--measures", "cka", "--drift-threshold", 0, *FAST)
    code, printed, _ = run_cli(capsys, *arguments)
    assert code == EXIT_OK
    assert "ALARM" in printed
    code, _, _ = run_cli(capsys, *arguments, "--fail-on-drift")
    assert code == EXIT_DRIFT
    code, _, _ = run_cli(capsys, "report", run / "tb", "--measures", "cka", "--fail-on-drift", *FAST)
    assert code == EXIT_OK


def test_report_finds_store_from_checkpoint(run, capsys):
    for folder in (run / "out" / "checkpoint-4", run / "out"):
        code, printed, err = run_cli(capsys, "report", folder, "--measures", "cka", *FAST)
        assert code == EXIT_OK, err
        assert str(run / "tb" / "snapshots") in printed


def test_report_on_model_without_run(run, capsys):
    code, _, err = run_cli(capsys, "report", run / "other_bert", *FAST)
    assert code == EXIT_INVALID_INPUT
    assert "without a monitored run" in err


def test_settling_steps_rule():
    steps = [0, 10, 20, 30]
    similarity = np.array(
        [
            [0.99, 0.90, 0.97, 1.0],  # dips below 0.95 at step 10, so it settles at 20
            [0.96, 0.97, 0.99, 1.0],  # within tolerance throughout
            [0.50, 0.60, 0.70, 1.0],  # only the final capture itself
            [0.99, np.nan, 0.99, 1.0],  # a NaN breaks the run
            [0.99, 0.99, 0.99, np.nan],  # no usable final capture
        ]
    )
    assert settling_steps(similarity, steps, tolerance=0.05) == [20, 0, 30, 20, None]


def test_store_keeps_probe_set(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    assert store.read_probe() is None
    store.write(0, {"layer": torch.randn(4, 3)}, fingerprint="a" * 64)
    examples = [{"input_ids": torch.tensor([2, 5, 3]), "attention_mask": [1, 1, 1], "labels": 1}]
    store.write_probe(examples, "a" * 64, {"pooling": "mean"})
    stored = SnapshotStore.open(tmp_path / "store").read_probe()
    assert stored["fingerprint"] == "a" * 64
    assert stored["settings"] == {"pooling": "mean"}
    assert stored["examples"] == [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}]
    with pytest.raises(ValueError, match="probe sets differ"):
        store.write_probe(examples, "b" * 64)


# Progress bars and the installed command.


def test_progress_bars_only_on_request(run, capsys):
    from contrasim_monitor.outputs import Progress

    with Progress(enabled=True).bar(range(3), total=3, description="counting") as bar:
        list(bar)
    assert "counting" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "report", run / "tb", "--measures", "cka")
    assert code == EXIT_OK
    assert "it/s" not in err  # standard error is not a terminal under pytest


def test_console_script_in_subprocess(run, tmp_path):
    script = Path(sys.executable).parent / "contrasim-monitor"
    assert script.exists(), "install the package (pip install -e .) to create the console script"
    completed = subprocess.run(
        [str(script), "report", str(run / "tb"), "--measures", "cka", "--drift-threshold", "0", "--fail-on-drift"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == EXIT_DRIFT, completed.stderr
    assert "Order in which the layers settle" in completed.stdout
    missing = subprocess.run([str(script), "report", str(tmp_path / "missing")], capture_output=True, text=True)
    assert missing.returncode == EXIT_INVALID_INPUT
    assert "not found" in missing.stderr


def test_report_runs_without_transformers(run):
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "from contrasim_monitor.cli import main\n"
        f"sys.exit(main(['report', {str(run / 'tb')!r}, '--measures', 'cka', '--quiet']))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == EXIT_OK, completed.stderr
