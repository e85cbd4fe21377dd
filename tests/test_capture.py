"""Layer resolution, pooling and hook handling of the capture step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from contrasim_monitor.capture import (
    CaptureError,
    capture_activations,
    match_module_name,
    pool_tokens,
    resolve_layers,
    unwrap_model,
)
from contrasim_monitor.probe import ProbeSet


def small_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertModel(config)


def batch(size: int = 6, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 2:] = 0
    return {"input_ids": torch.randint(1, 50, (size, length), generator=generator), "attention_mask": mask}


def test_auto_layers_bert():
    names = [spec.name for spec in resolve_layers(small_bert())]
    assert names == ["embeddings", "encoder.layer.0", "encoder.layer.1"]


def test_auto_layers_gpt2():
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=16)
    names = [spec.name for spec in resolve_layers(GPT2LMHeadModel(config))]
    assert names == ["embeddings", "transformer.h.0", "transformer.h.1", "transformer.h.2"]


def test_glob_and_unknown_layer():
    model = small_bert()
    assert [s.name for s in resolve_layers(model, ["encoder.layer.*"])] == ["encoder.layer.0", "encoder.layer.1"]
    with pytest.raises(ValueError, match="matches no module") as excinfo:
        resolve_layers(model, ["encoder.layers.0"])
    assert "encoder.layer.0" in str(excinfo.value)


def test_auto_layers_without_blocks_raises():
    with pytest.raises(ValueError, match="layers="):
        resolve_layers(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))


def test_embeddings_equal_hidden_states():
    model = small_bert()
    inputs = batch()
    layers = resolve_layers(model)
    pooled = capture_activations(model, [inputs], layers, pooling="first")
    model.eval()
    with torch.no_grad():
        hidden_states = model(**inputs, output_hidden_states=True).hidden_states
    for index, name in enumerate(["embeddings", "encoder.layer.0", "encoder.layer.1"]):
        torch.testing.assert_close(pooled[name], hidden_states[index][:, 0])


def test_mean_pooling_ignores_padding():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    pooled = pool_tokens(hidden, mask, "mean")
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    torch.testing.assert_close(pooled[2], hidden[2, 2:].mean(0))


def test_last_pooling_handles_both_padding_sides():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    pooled = pool_tokens(hidden, mask, "last")
    torch.testing.assert_close(pooled[0], hidden[0, 2])
    torch.testing.assert_close(pooled[1], hidden[1, 4])


def test_half_precision_pooling_does_not_overflow():
    hidden = torch.full((2, 8, 3), 60000.0, dtype=torch.float16)
    pooled = pool_tokens(hidden, torch.ones(2, 8), "mean")
    assert pooled.dtype == torch.float32
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, torch.full((2, 3), 60000.0))


def test_capture_restores_mode_rng_and_hooks():
    model = small_bert().train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    capture_activations(model, [batch()], resolve_layers(model))
    assert torch.equal(torch.rand(3), expected)
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_removes_hooks_when_forward_raises():
    model = small_bert()
    bad = {"input_ids": torch.full((2, 3), 999)}  # index out of the embedding table
    with pytest.raises(IndexError):
        capture_activations(model, [bad], resolve_layers(model))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unused_module_raises_capture_error():
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = WithSpare()
    with pytest.raises(CaptureError, match="no activations"):
        capture_activations(model, [{"x": torch.randn(3, 4)}], resolve_layers(model, ["used", "spare"]))


def test_module_called_twice_raises():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(self.inner(x))

    model = Twice()
    with pytest.raises(CaptureError, match="2 times"):
        capture_activations(model, [{"x": torch.randn(3, 4)}], resolve_layers(model, ["inner"]))


def test_unwrap_compiled_and_data_parallel():
    model = small_bert()
    assert unwrap_model(nn.DataParallel(model)) is model
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert [s.name for s in resolve_layers(compiled)] == ["embeddings", "encoder.layer.0", "encoder.layer.1"]


def test_probe_set_pads_and_fingerprints():
    examples = [{"input_ids": [1, 2, 3], "labels": 1}, {"input_ids": [4, 5], "labels": 0}]
    probe = ProbeSet(examples, batch_size=8)
    (collated,) = list(probe.batches())
    assert "labels" not in collated
    assert collated["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert collated["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert probe.fingerprint() == ProbeSet(list(reversed(examples))[::-1]).fingerprint()
    assert probe.fingerprint() != ProbeSet(examples[:1]).fingerprint()


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("encoder.layer.*", "encoder.layer.3", True),
        ("encoder.layer.*", "encoder.layer.3.attention", False),
        ("encoder.layer.[02]", "encoder.layer.2", True),
        ("encoder.layer.[02]", "encoder.layer.1", False),
        ("**.output", "encoder.layer.0.output", True),
        ("**.dense", "pooler.dense", True),
        ("encoder.**", "encoder", True),
        ("encoder", "encoder.layer", False),
    ],
)
def test_match_module_name(pattern, name, expected):
    assert match_module_name(pattern, name) is expected


def test_short_layer_names_drop_shared_prefix():
    from contrasim_monitor.heatmap import short_layer_names

    names = ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.11"]
    assert short_layer_names(names) == ["embeddings", "layer.0", "layer.11"]
    assert short_layer_names(["fc1", "fc2"]) == ["fc1", "fc2"]
    assert short_layer_names(["encoder.a.x", "decoder.b"]) == ["encoder.a.x", "decoder.b"]


def test_sample_positions_independent_of_batching():
    model = small_bert()
    inputs = batch(size=6, length=7)
    layers = resolve_layers(model, ["encoder.layer.1"])
    whole = capture_activations(model, [inputs], layers, pooling="sample", tokens_per_example=3, seed=4)
    halves = [{k: v[:2] for k, v in inputs.items()}, {k: v[2:] for k, v in inputs.items()}]
    split = capture_activations(model, halves, layers, pooling="sample", tokens_per_example=3, seed=4)
    assert whole["encoder.layer.1"].shape == (18, 16)
    torch.testing.assert_close(whole["encoder.layer.1"], split["encoder.layer.1"])
    reseeded = capture_activations(model, [inputs], layers, pooling="sample", tokens_per_example=3, seed=5)
    assert not torch.equal(whole["encoder.layer.1"], reseeded["encoder.layer.1"])


def test_sample_positions_stay_on_real_tokens():
    from contrasim_monitor.capture import sample_positions

    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    positions = sample_positions(mask, tokens_per_example=4, seed=0, first_example_index=0)
    assert positions.shape == (3, 4)
    for row in range(3):
        assert bool(mask[row, positions[row]].all())
    # Five real tokens and four draws: no position repeats.
    assert len(set(positions[1].tolist())) == 4


def test_first_pooling_skips_left_padding():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    pooled = pool_tokens(hidden, mask, "first")
    torch.testing.assert_close(pooled[0], hidden[0, 2])
    torch.testing.assert_close(pooled[1], hidden[1, 0])


def test_capture_restores_submodule_modes():
    model = small_bert().train()
    model.embeddings.eval()
    capture_activations(model, [batch()], resolve_layers(model))
    assert model.training
    assert not model.embeddings.training
    assert model.encoder.training


def test_restrict_to_model_drops_raw_columns_despite_kwargs():
    model = small_bert()
    probe = ProbeSet([{"input_ids": [1, 2], "text": "hello", "idx": 3, "labels": 1}])
    probe.restrict_to_model(model)
    assert set(probe.examples[0]) == {"input_ids", "labels"}
    (collated,) = list(probe.batches())
    assert set(collated) == {"input_ids", "attention_mask"}


class TorchEncoder(nn.Module):
    """A model built on nn.TransformerEncoder, whose eval-mode fast path packs tokens into nested tensors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3)  # enable_nested_tensor=True, the default

    def forward(self, input_ids, attention_mask):
        return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)


def torch_encoder_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 2:] = 0
    return {"input_ids": torch.randint(1, 50, (4, 9), generator=generator), "attention_mask": mask}


@pytest.mark.parametrize("pooling", ["mean", "first", "last", "sample"])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_fast_path_matches_slow_path(pooling):
    model = TorchEncoder().eval()
    layers = resolve_layers(model)
    assert [spec.name for spec in layers] == ["embeddings", "encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]
    fast = capture_activations(model, [torch_encoder_batch()], layers, pooling, tokens_per_example=3)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        slow = capture_activations(model, [torch_encoder_batch()], layers, pooling, tokens_per_example=3)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_hook_skipped_by_fused_attention_raises():
    # nn.MultiheadAttention reads out_proj's weights directly, so a hook on out_proj never runs.
    model = TorchEncoder().eval()
    layers = resolve_layers(model, ["encoder.layers.0.self_attn.out_proj"])
    with pytest.raises(CaptureError, match="forward hook did\\s+not run"):
        capture_activations(model, [torch_encoder_batch()], layers)


class NoMaskModel(nn.Module):
    """A model whose forward takes input_ids only, so the attention_mask is for pooling alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def test_forward_without_attention_mask_keeps_mask_for_pooling():
    model = NoMaskModel()
    batch = torch_encoder_batch()
    layers = resolve_layers(model)
    pooled = capture_activations(model, [batch], layers, "mean")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        hidden = model.blocks[1](model.blocks[0](model.embed(batch["input_ids"])))
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(pooled["blocks.1"], expected)
