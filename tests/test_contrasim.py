"""Tests of ContraSim: config checks, batched against one-pair fits, the loss, and the behaviour of the measure."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import contrasim_monitor.contrasim as contrasim_module
from contrasim_monitor.contrasim import (
    ContraSim,
    ContraSimConfig,
    _HeadGroup,
    _stack_by_width,
    contrasim_head_config,
    contrasim_pairs,
)

# Small encoders and few epochs keep each fit well under a second; properties that need training use more epochs.
SMALL = ContraSimConfig(hidden_dims=(32, 16), out_dim=8, epochs=3, batch_size=64)


def _features(num_examples: int = 96, widths: tuple[int, ...] = (12, 12, 7, 12), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(num_examples, width, generator=generator) for width in widths]


def _split(num_examples: int = 96, num_train: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(num_train), torch.arange(num_train, num_examples)


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_published_values() -> None:
    config = ContraSimConfig()

    assert config.encoder == "mlp"
    assert config.hidden_dims == (512, 256)
    assert config.out_dim == 128
    assert config.temperature == 0.07
    assert config.lr == 1e-4
    assert config.batch_size == 1024
    assert config.epochs == 50
    assert config.layer_dims == (512, 256, 128)
    assert config.resolved_shuffle_seed == config.seed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("encoder", "transformer"),
        ("hidden_dims", (512, 0)),
        ("hidden_dims", (512.0,)),
        ("hidden_dims", ()),
        ("hidden_dims", 512),
        ("out_dim", 0),
        ("out_dim", 2.5),
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("temperature", True),
        ("lr", -1e-4),
        ("lr", float("inf")),
        ("batch_size", 1),
        ("batch_size", 64.0),
        ("epochs", 0),
        ("seed", -1),
        ("seed", 1.5),
        ("shuffle_seed", -3),
    ],
)
def test_config_rejects_invalid_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"ContraSimConfig\.{field} must") as raised:
        ContraSimConfig(**{field: value})

    assert repr(value) in str(raised.value)


def test_config_converts_list_hidden_dims() -> None:
    config = ContraSimConfig(hidden_dims=[64, 32])

    assert config.hidden_dims == (64, 32)


def test_config_linear_encoder_allows_empty_hidden() -> None:
    config = ContraSimConfig(encoder="linear", hidden_dims=())

    assert config.layer_dims == (128,)


def test_head_config_seeding_rule() -> None:
    config = ContraSimConfig(seed=7)

    head = contrasim_head_config(config, 3)

    assert head.seed == 10
    assert head.shuffle_seed == 7
    assert contrasim_head_config(dataclasses.replace(config, shuffle_seed=2), 3).shuffle_seed == 2


def test_estimator_rejects_unknown_override() -> None:
    with pytest.raises(TypeError, match="epoch"):
        ContraSim(epoch=3)


# ---------------------------------------------------------------------------------------------------------------------
# Batched fit


def test_pairs_shape_dtype_and_range() -> None:
    features = _features()
    train_index, test_index = _split()

    scores = contrasim_pairs(features, [(0, 1), (1, 2), (2, 2)], train_index, test_index, SMALL)

    assert scores.shape == (3,)
    assert scores.dtype == torch.float64
    assert scores.device.type == "cpu"
    assert bool(((scores >= -1.0) & (scores <= 1.0)).all())


def test_pairs_deterministic_for_seed() -> None:
    features = _features()
    train_index, test_index = _split()
    pairs = [(0, 1), (0, 2), (3, 1)]

    first = contrasim_pairs(features, pairs, train_index, test_index, SMALL)
    second = contrasim_pairs(features, pairs, train_index, test_index, SMALL)
    other_seed = contrasim_pairs(features, pairs, train_index, test_index, dataclasses.replace(SMALL, seed=1))

    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


@pytest.mark.parametrize("encoder", ["mlp", "linear"])
def test_batched_matches_one_pair_fits(encoder: str) -> None:
    # Widths 12 and 7 give one same-width group and two mixed-width groups, (12, 7) and (7, 12). 64 training examples
    # with batch_size 24 give three shuffled mini-batches per epoch.
    features = _features()
    train_index, test_index = _split()
    pairs = [(0, 1), (0, 2), (2, 0), (1, 3), (2, 2), (3, 0), (1, 2)]
    config = dataclasses.replace(SMALL, encoder=encoder, batch_size=24, epochs=4, seed=5)

    batched = contrasim_pairs(features, pairs, train_index, test_index, config)

    for head, (a, b) in enumerate(pairs):
        if a == b:
            continue
        alone = ContraSim(contrasim_head_config(config, head)).fit(features[a][train_index], features[b][train_index])
        score = alone.score(features[a][test_index], features[b][test_index])
        assert score == pytest.approx(batched[head].item(), abs=1e-4), f"pair {head} = {(a, b)}"


def test_cpu_chunking_leaves_scores_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    features = _features()
    train_index, test_index = _split()
    pairs = [(0, 1), (0, 3), (1, 3), (3, 1), (0, 2)]

    whole = contrasim_pairs(features, pairs, train_index, test_index, SMALL)
    # A one-byte budget puts every head in a chunk of its own.
    monkeypatch.setattr(contrasim_module, "_CPU_BYTES_PER_THREAD", 1)
    chunked = contrasim_pairs(features, pairs, train_index, test_index, SMALL)

    assert torch.allclose(whole, chunked, rtol=0.0, atol=1e-6)


def test_diagonal_pair_scores_exactly_one() -> None:
    features = _features()
    train_index, test_index = _split()

    only_diagonal = contrasim_pairs(features, [(1, 1), (2, 2)], train_index, test_index, SMALL)
    mixed = contrasim_pairs(features, [(0, 0), (0, 1)], train_index, test_index, SMALL)

    assert only_diagonal.tolist() == [1.0, 1.0]
    assert mixed[0].item() == 1.0


def test_pairs_empty_list() -> None:
    features = _features()
    train_index, test_index = _split()

    scores = contrasim_pairs(features, [], train_index, test_index, SMALL)

    assert scores.shape == (0,)
    assert scores.dtype == torch.float64


def test_different_widths_both_orders() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(96, 12, generator=generator)
    y = torch.tanh(x[:, :7] + 0.1 * torch.randn(96, 7, generator=generator))
    train_index, test_index = _split()
    config = dataclasses.replace(SMALL, epochs=30, lr=1e-3)

    scores = contrasim_pairs([x, y], [(0, 1), (1, 0)], train_index, test_index, config)

    assert bool(torch.isfinite(scores).all())
    assert scores[0].item() > 0.3
    assert scores[1].item() > 0.3


def test_half_precision_inputs_upcast() -> None:
    features = [feature.to(torch.bfloat16) for feature in _features()[:2]]
    features.append(_features()[2].to(torch.float16))
    train_index, test_index = _split()
    pairs = [(0, 1), (0, 2)]

    from_half = contrasim_pairs(features, pairs, train_index, test_index, SMALL)
    from_float = contrasim_pairs([f.float() for f in features], pairs, train_index, test_index, SMALL)

    assert torch.equal(from_half, from_float)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pairs_on_cuda_match_cpu() -> None:
    features = _features()
    train_index, test_index = _split()
    pairs = [(0, 1), (0, 2)]

    on_cuda = contrasim_pairs([f.cuda() for f in features], pairs, train_index, test_index, SMALL)
    on_cpu = contrasim_pairs(features, pairs, train_index, test_index, SMALL)

    assert on_cuda.device.type == "cpu"
    assert torch.allclose(on_cuda, on_cpu, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Input validation


def test_pairs_rejects_mismatched_examples() -> None:
    features = _features()
    features[2] = features[2][:-1]
    train_index, test_index = _split(95)

    with pytest.raises(ValueError, match=r"features\[2\] has 95"):
        contrasim_pairs(features, [(0, 1)], train_index, test_index, SMALL)


def test_pairs_rejects_one_dimensional_feature() -> None:
    features = _features()
    features[1] = features[1][:, 0]
    train_index, test_index = _split()

    with pytest.raises(ValueError, match=r"features\[1\] must be a 2-D"):
        contrasim_pairs(features, [(0, 1)], train_index, test_index, SMALL)


@pytest.mark.parametrize("pair", [(0, 4), (-1, 0), (0, 1, 2)])
def test_pairs_rejects_invalid_pair(pair: tuple[int, ...]) -> None:
    features = _features()
    train_index, test_index = _split()

    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        contrasim_pairs(features, [(0, 1), pair], train_index, test_index, SMALL)


@pytest.mark.parametrize(
    ("train_index", "test_index", "message"),
    [
        (torch.arange(0), torch.arange(64, 96), "train_index must contain at least 2"),
        (torch.arange(64), torch.arange(0), "test_index must contain at least 1"),
        (torch.arange(64), torch.arange(60, 96), "share 4 example"),
        (torch.arange(64), torch.arange(64, 97), r"test_index must lie in \[0, 96\)"),
        (torch.tensor([0, 1, 1]), torch.arange(64, 96), "repeated"),
        (torch.arange(64).float(), torch.arange(64, 96), "integer tensor"),
        (torch.arange(64).view(8, 8), torch.arange(64, 96), "1-D integer tensor"),
    ],
)
def test_pairs_rejects_invalid_split(train_index: torch.Tensor, test_index: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        contrasim_pairs(_features(), [(0, 1)], train_index, test_index, SMALL)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_pairs_rejects_non_finite_feature(bad_value: float) -> None:
    features = _features()
    features[1][70, 3] = bad_value
    train_index, test_index = _split()

    with pytest.raises(ValueError, match=r"features\[1\] contains NaN or inf"):
        contrasim_pairs(features, [(0, 1)], train_index, test_index, SMALL)
    with pytest.raises(ValueError, match=r"features\[1\] contains NaN or inf"):
        contrasim_pairs(features, [(1, 1)], train_index, test_index, SMALL)


def test_pairs_ignores_unused_non_finite_feature() -> None:
    features = _features()
    features[3][:] = float("nan")
    train_index, test_index = _split()

    scores = contrasim_pairs(features, [(0, 1)], train_index, test_index, SMALL)

    assert bool(torch.isfinite(scores).all())


def test_estimator_score_before_fit_raises() -> None:
    x = torch.randn(10, 4)

    with pytest.raises(RuntimeError, match="not fitted"):
        ContraSim(SMALL).score(x, x)


def test_estimator_score_rejects_other_widths() -> None:
    x, y = _features(widths=(12, 7))
    measure = ContraSim(SMALL).fit(x[:64], y[:64])

    with pytest.raises(ValueError, match=r"fit saw \(12, 7\)"):
        measure.score(y[64:], x[64:])


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def _reference_supcon_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """Two-view SupCon loss written out directly: positives are the other view, all other points are negatives."""
    points = torch.cat([first, second])
    num_points = points.shape[0]
    logits = points @ points.T / temperature
    logits = logits.masked_fill(torch.eye(num_points, dtype=torch.bool), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (torch.arange(num_points) + num_points // 2) % num_points
    return -log_prob[torch.arange(num_points), positive].mean()


def _reference_encode(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    hidden = x
    for position, (weight, bias) in enumerate(layers):
        if position > 0:
            hidden = torch.relu(hidden)
        hidden = hidden @ weight + bias
    return F.normalize(hidden, dim=-1)


@pytest.mark.parametrize("temperature", [0.07, 0.01])
@pytest.mark.parametrize("widths", [(12, 12), (12, 7)])
def test_loss_and_gradients_match_reference(temperature: float, widths: tuple[int, int]) -> None:
    # Temperature 0.01 exceeds the unshifted-logit limit, so it runs the row-max-shifted path of the loss.
    config = dataclasses.replace(SMALL, temperature=temperature)
    features = _features(num_examples=40, widths=widths)
    stacks, slots = _stack_by_width(features, [0, 1], torch.arange(40), torch.device("cpu"))
    group = _HeadGroup(
        widths[0], widths[1], [slots[0], slots[0]], [slots[1], slots[1]], [0, 1], config, torch.device("cpu")
    )

    losses = group.loss(stacks, None)
    losses.sum().backward()

    for head in range(2):
        weights = [w[head].detach().clone().requires_grad_() for w in group.weights]
        biases = [b[head].detach().clone().requires_grad_() for b in group.biases]
        layers = list(zip(weights, biases, strict=True))
        first_layers = layers[:1] + layers[2:] if widths[0] != widths[1] else layers
        second_layers = layers[1:] if widths[0] != widths[1] else layers
        expected = _reference_supcon_loss(
            _reference_encode(features[0], first_layers), _reference_encode(features[1], second_layers), temperature
        )
        expected.backward()

        assert losses[head].item() == pytest.approx(expected.item(), rel=1e-5)
        for stacked, single in zip(group.weights + group.biases, weights + biases, strict=True):
            assert torch.allclose(stacked.grad[head], single.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Behaviour of the measure


def _nonlinear_views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(768, 16, generator=generator)
    mixing = torch.randn(16, 16, generator=generator) / 4.0
    return x, (x @ mixing) ** 3


def test_matched_scores_above_shuffled() -> None:
    x, y = _nonlinear_views()
    shuffle = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    measure = ContraSim(epochs=30, lr=1e-3).fit(x[:512], y[:512])

    matched = measure.score(x[512:], y[512:])
    shuffled = measure.score(x[512:], y[512:][shuffle])

    assert matched > 0.5
    assert abs(shuffled) < 0.15
    assert matched - shuffled > 0.4


def test_nonlinear_gap_wider_than_linear_cka() -> None:
    measures = pytest.importorskip("contrasim_monitor.measures")
    x, y = _nonlinear_views()
    x_test, y_test = x[512:], y[512:]
    y_shuffled = y_test[torch.randperm(256, generator=torch.Generator().manual_seed(1))]
    measure = ContraSim(epochs=30, lr=1e-3).fit(x[:512], y[:512])

    contrasim_gap = measure.score(x_test, y_test) - measure.score(x_test, y_shuffled)
    cka_gap = (measures.linear_cka(x_test, y_test) - measures.linear_cka(x_test, y_shuffled)).item()

    assert contrasim_gap > cka_gap + 0.1


def test_scores_fall_with_layer_distance() -> None:
    # A residual random network whose hidden state drifts a little further from the input at every layer.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(768, 32, generator=generator)
    layers = [hidden]
    for _ in range(5):
        weight = torch.randn(32, 32, generator=generator) * (1.5 / 32**0.5)
        hidden = hidden + torch.tanh(hidden @ weight)
        hidden = hidden / hidden.std()
        layers.append(hidden)
    pairs = [(0, depth) for depth in range(1, 6)]

    scores = contrasim_pairs(
        layers, pairs, torch.arange(512), torch.arange(512, 768), ContraSimConfig(epochs=30, lr=1e-3)
    )

    for depth in range(1, 5):
        assert scores[depth - 1] > scores[depth], f"score(0, {depth}) <= score(0, {depth + 1}): {scores.tolist()}"
    assert scores[0] - scores[4] > 0.15
