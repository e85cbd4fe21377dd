"""Tests of the closed-form similarity measures against the float64 numpy reference in reference_measures.py."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import reference_measures as ref
import torch

from contrasim_monitor.measures import (
    ConstantInputWarning,
    MinibatchCKA,
    NonFiniteError,
    ProcrustesResult,
    linear_cka,
    linear_cka_matrix,
    mutual_knn,
    procrustes,
    pwcca,
    svcca,
)
from contrasim_monitor.measures import cka as cka_module

TOLERANCE = {"rtol": 1e-9, "atol": 1e-10}


def related_pair(rng: np.random.Generator, n: int, width_x: int, width_y: int, noise: float = 1.0):
    """Return (n, width_x) and (n, width_y) float64 arrays that share a linear signal plus independent noise."""
    x = rng.normal(size=(n, width_x)) + rng.normal(size=width_x)
    shared = min(width_x, width_y, 8)
    y = x[:, :shared] @ rng.normal(size=(shared, width_y)) + noise * rng.normal(size=(n, width_y))
    return x, y


def random_orthogonal(rng: np.random.Generator, width: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(width, width)))
    return q * np.sign(np.diag(r))


def ill_conditioned_map(rng: np.random.Generator, width: int) -> np.ndarray:
    """Return an invertible (width, width) map whose scales span four orders of magnitude."""
    scales = np.logspace(-2, 2, width)
    return random_orthogonal(rng, width) @ np.diag(scales) @ random_orthogonal(rng, width)


def as_float(value: torch.Tensor) -> float:
    assert value.dtype == torch.float64
    assert value.ndim == 0
    return float(value)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# Every scalar measure, called with the library's defaults, next to its reference. PWCCA and SVCCA need N > D_x + D_y.
SCALAR_MEASURES: dict[str, tuple[Callable, Callable]] = {
    "linear_cka": (linear_cka, ref.linear_cka),
    "linear_cka_unbiased": (
        lambda x, y: linear_cka(x, y, unbiased=True),
        lambda x, y: ref.linear_cka(x, y, unbiased=True),
    ),
    "svcca": (svcca, ref.svcca),
    "pwcca": (pwcca, ref.pwcca),
    "procrustes": (lambda x, y: procrustes(x, y).similarity, lambda x, y: ref.procrustes(x, y)[0]),
    "mutual_knn": (mutual_knn, lambda x, y: ref.mutual_knn(x, y, k=10)),
}
SYMMETRIC_MEASURES = [name for name in SCALAR_MEASURES if name != "pwcca"]


# ---------------------------------------------------------------------------------------------------------------------
# Behaviour shared by every measure


@pytest.mark.parametrize("name", SCALAR_MEASURES)
@pytest.mark.parametrize(("width_x", "width_y"), [(12, 5), (5, 12)])
def test_measure_different_widths(rng, name, width_x, width_y):
    measure, reference = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 80, width_x, width_y)
    np.testing.assert_allclose(
        as_float(measure(torch.from_numpy(x), torch.from_numpy(y))), reference(x, y), **TOLERANCE
    )


@pytest.mark.parametrize("name", SCALAR_MEASURES)
def test_measure_self_similarity_one(rng, name):
    measure, _ = SCALAR_MEASURES[name]
    x, _ = related_pair(rng, 80, 10, 4)
    np.testing.assert_allclose(as_float(measure(x, x)), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SYMMETRIC_MEASURES)
def test_measure_is_symmetric(rng, name):
    measure, _ = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 80, 10, 6)
    np.testing.assert_allclose(as_float(measure(x, y)), as_float(measure(y, x)), **TOLERANCE)


@pytest.mark.parametrize("name", SCALAR_MEASURES)
def test_measure_numpy_input(rng, name):
    measure, _ = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 60, 6, 4)
    result = measure(x.astype(np.float32), y.astype(np.float32))
    assert isinstance(result, torch.Tensor)
    assert result.dtype == torch.float64
    assert result.device == torch.device("cpu")
    assert result.ndim == 0


@pytest.mark.parametrize("name", SCALAR_MEASURES)
def test_measure_rejects_mismatched_example_counts(rng, name):
    measure, _ = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 60, 6, 4)
    with pytest.raises(
        ValueError, match=r"y must have the same number of examples .* expected shape \(60, D\), got \(59, 4\)"
    ):
        measure(x, y[:59])


@pytest.mark.parametrize("name", SCALAR_MEASURES)
@pytest.mark.parametrize("shape", [(60,), (60, 3, 2)])
def test_measure_rejects_non_matrix_input(rng, name, shape):
    measure, _ = SCALAR_MEASURES[name]
    x, _ = related_pair(rng, 60, 6, 4)
    bad = rng.normal(size=shape)
    with pytest.raises(ValueError, match=rf"y must be a 2-D \(examples, features\) array, got {len(shape)}-D"):
        measure(x, bad)
    with pytest.raises(ValueError, match=rf"x must be a 2-D \(examples, features\) array, got {len(shape)}-D"):
        measure(bad, x)


@pytest.mark.parametrize("name", SCALAR_MEASURES)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_measure_raises_non_finite_error(rng, name, bad_value):
    measure, _ = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 60, 6, 4)
    y_bad = y.copy()
    y_bad[3, 1] = bad_value
    y_bad[7, 2] = bad_value
    with pytest.raises(NonFiniteError, match=r"^y contains 2 non-finite values \(NaN or inf\) out of 240"):
        measure(x, y_bad)
    with pytest.raises(NonFiniteError, match=r"^x contains 2 non-finite values"):
        measure(y_bad, x)


def test_non_finite_error_is_value_error():
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("name", SCALAR_MEASURES)
@pytest.mark.parametrize("constant_value", [0.0, 0.1])
def test_measure_constant_input_nan(rng, name, constant_value):
    measure, _ = SCALAR_MEASURES[name]
    x, _ = related_pair(rng, 60, 6, 4)
    constant = np.full((60, 5), constant_value)
    with pytest.warns(ConstantInputWarning, match="y is constant across examples") as record:
        result = measure(x, constant)
    assert math.isnan(as_float(result))
    # stacklevel points the warning at the caller of the public function, which here is this test file or the
    # lambda in SCALAR_MEASURES, both in this file.
    assert record[0].filename == __file__


@pytest.mark.parametrize("name", SCALAR_MEASURES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_measure_half_precision_no_overflow(rng, name, dtype):
    measure, _ = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 80, 12, 5)
    # Values up to 2e4: any product formed in 16-bit precision would overflow (float16 max is 65504).
    x_half = torch.from_numpy(x / np.abs(x).max() * 2e4).to(dtype)
    y_half = torch.from_numpy(y / np.abs(y).max() * 2e4).to(dtype)
    expected = as_float(measure(x_half.double(), y_half.double()))
    result = as_float(measure(x_half, y_half))
    assert math.isfinite(result)
    np.testing.assert_allclose(result, expected, **TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SCALAR_MEASURES)
def test_measure_on_cuda_matches_cpu(rng, name):
    measure, _ = SCALAR_MEASURES[name]
    x, y = related_pair(rng, 80, 12, 5)
    x_cuda = torch.from_numpy(x).float().cuda()
    y_cuda = torch.from_numpy(y).float().cuda()
    result = measure(x_cuda, y_cuda)
    assert result.device.type == "cuda"
    np.testing.assert_allclose(float(result), as_float(measure(x_cuda.cpu(), y_cuda.cpu())), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Linear CKA


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize(("n", "width_x", "width_y"), [(20, 50, 30), (20, 30, 50), (200, 6, 9), (40, 40, 40)])
def test_linear_cka_matches_reference(rng, unbiased, n, width_x, width_y):
    x, y = related_pair(rng, n, width_x, width_y)
    np.testing.assert_allclose(
        as_float(linear_cka(x, y, unbiased=unbiased)), ref.linear_cka(x, y, unbiased=unbiased), **TOLERANCE
    )


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("use_gram", [False, True])
@pytest.mark.parametrize(("n", "width_x", "width_y"), [(20, 50, 30), (200, 6, 9)])
def test_linear_cka_forms_agree(rng, monkeypatch, unbiased, use_gram, n, width_x, width_y):
    monkeypatch.setattr(cka_module, "_use_gram_form", lambda *args: use_gram)
    x, y = related_pair(rng, n, width_x, width_y)
    expected = ref.linear_cka(x, y, unbiased=unbiased)
    np.testing.assert_allclose(as_float(linear_cka(x, y, unbiased=unbiased)), expected, **TOLERANCE)
    matrix = linear_cka_matrix([x, y], unbiased=unbiased)
    np.testing.assert_allclose(matrix[0, 1].item(), expected, **TOLERANCE)


def test_use_gram_form_follows_cost():
    assert cka_module._use_gram_form(100, [1000], [1000])
    assert not cka_module._use_gram_form(10_000, [100], [100])
    # Above the memory limit the feature form is used even where the Gram form needs less arithmetic.
    assert not cka_module._use_gram_form(20_000, [100_000], [100_000])


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_similarity_invariances(rng, unbiased):
    x, y = related_pair(rng, 60, 10, 7)
    transformed = 3.5 * x @ random_orthogonal(rng, 10) + rng.normal(size=10) * 100
    np.testing.assert_allclose(as_float(linear_cka(x, transformed, unbiased=unbiased)), 1.0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        as_float(linear_cka(transformed, y, unbiased=unbiased)),
        as_float(linear_cka(x, y, unbiased=unbiased)),
        **TOLERANCE,
    )


def test_linear_cka_not_invariant_to_invertible_map(rng):
    x = rng.normal(size=(200, 10))
    mapped = x @ ill_conditioned_map(rng, 10)
    assert np.linalg.matrix_rank(mapped) == 10
    assert as_float(linear_cka(x, mapped)) < 0.8


def test_linear_cka_unbiased_needs_four_examples(rng):
    x, y = related_pair(rng, 3, 5, 5)
    with pytest.raises(ValueError, match="unbiased HSIC estimator needs at least 4 examples, but x has 3"):
        linear_cka(x, y, unbiased=True)
    assert math.isfinite(as_float(linear_cka(x, y)))


def test_linear_cka_single_example_is_nan(rng):
    x, y = related_pair(rng, 1, 5, 5)
    with pytest.warns(ConstantInputWarning, match="x, y are constant"):
        assert math.isnan(as_float(linear_cka(x, y)))


def test_linear_cka_moves_y_to_device_of_x(rng):
    x, y = related_pair(rng, 30, 5, 5)
    result = linear_cka(torch.from_numpy(x), y)
    assert result.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Linear CKA matrix


def make_layers(rng: np.random.Generator, n: int, widths: list[int]) -> list[np.ndarray]:
    """Return activations of a toy network: each layer is a noisy linear map of the one before."""
    layers = [rng.normal(size=(n, widths[0]))]
    for width in widths[1:]:
        previous = layers[-1]
        layers.append(
            np.tanh(previous @ rng.normal(size=(previous.shape[1], width))) + 0.5 * rng.normal(size=(n, width))
        )
    return layers


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n", [16, 60])
def test_cka_matrix_matches_pairwise(rng, unbiased, n):
    layers = make_layers(rng, n, [24, 8, 40, 8])
    matrix = linear_cka_matrix(layers, unbiased=unbiased)
    assert matrix.shape == (4, 4)
    assert matrix.dtype == torch.float64
    for i, x in enumerate(layers):
        for j, y in enumerate(layers):
            np.testing.assert_allclose(matrix[i, j].item(), as_float(linear_cka(x, y, unbiased=unbiased)), **TOLERANCE)
            np.testing.assert_allclose(matrix[i, j].item(), ref.linear_cka(x, y, unbiased=unbiased), **TOLERANCE)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matrix_is_symmetric_with_unit_diagonal(rng, unbiased):
    layers = make_layers(rng, 50, [12, 30, 7, 12, 64])
    matrix = linear_cka_matrix(layers, unbiased=unbiased)
    assert torch.equal(matrix, matrix.T)
    assert torch.equal(matrix.diagonal(), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matrix_two_sequences(rng, unbiased):
    layers = make_layers(rng, 40, [24, 8, 60, 8, 16])
    xs, ys = layers[:2], layers[2:]
    matrix = linear_cka_matrix(xs, ys, unbiased=unbiased)
    assert matrix.shape == (2, 3)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            np.testing.assert_allclose(matrix[i, j].item(), as_float(linear_cka(x, y, unbiased=unbiased)), **TOLERANCE)


def test_cka_matrix_constant_layer_nan(rng):
    layers = make_layers(rng, 30, [6, 6, 6])
    layers[1] = np.zeros((30, 4))
    with pytest.warns(ConstantInputWarning, match=r"linear_cka_matrix: xs\[1\] is constant") as record:
        matrix = linear_cka_matrix(layers)
    assert len(record) == 1
    assert torch.isnan(matrix[1]).all()
    assert torch.isnan(matrix[:, 1]).all()
    assert not torch.isnan(matrix[[0, 2]][:, [0, 2]]).any()


def test_cka_matrix_rejects_bad_sequences(rng):
    layers = make_layers(rng, 30, [6, 6])
    with pytest.raises(ValueError, match="xs must contain at least one"):
        linear_cka_matrix([])
    with pytest.raises(ValueError, match="ys must contain at least one"):
        linear_cka_matrix(layers, [])
    with pytest.raises(ValueError, match=r"xs\[1\] must have the same number of examples .* got \(29, 6\)"):
        linear_cka_matrix([layers[0], layers[1][:29]])
    with pytest.raises(ValueError, match=r"ys\[0\] must have the same number of examples \(rows\) as xs\[0\]"):
        linear_cka_matrix(layers, [layers[1][:29]])
    with pytest.raises(NonFiniteError, match=r"ys\[0\] contains 1 non-finite"):
        bad = layers[1].copy()
        bad[0, 0] = math.nan
        linear_cka_matrix(layers, [bad])


def test_cka_matrix_accepts_mixed_dtypes(rng):
    layers = make_layers(rng, 30, [6, 9])
    inputs = [torch.from_numpy(layers[0]).to(torch.bfloat16), layers[1].astype(np.float32)]
    matrix = linear_cka_matrix(inputs)
    expected = ref.linear_cka(inputs[0].double().numpy(), inputs[1].astype(np.float64))
    np.testing.assert_allclose(matrix[0, 1].item(), expected, **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# Mini-batch CKA


def split_batches(values: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [values[start : start + batch_size] for start in range(0, values.shape[0], batch_size)]


@pytest.mark.parametrize("unbiased", [False, True])
def test_minibatch_cka_single_batch(rng, unbiased):
    x, y = related_pair(rng, 64, 12, 20)
    metric = MinibatchCKA(unbiased=unbiased)
    metric.update(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(as_float(metric.compute()), as_float(linear_cka(x, y, unbiased=unbiased)), **TOLERANCE)


@pytest.mark.parametrize("unbiased", [False, True])
def test_minibatch_cka_summed_hsic_ratio(rng, unbiased):
    x, y = related_pair(rng, 100, 12, 20)
    # Unequal batch sizes, including a short last batch: every batch counts once.
    x_batches = [x[:30], x[30:50], x[50:94], x[94:]]
    y_batches = [y[:30], y[30:50], y[50:94], y[94:]]
    metric = MinibatchCKA(unbiased=unbiased)
    for x_batch, y_batch in zip(x_batches, y_batches, strict=True):
        metric.update(x_batch, y_batch)
    assert metric.num_batches == 4
    np.testing.assert_allclose(
        as_float(metric.compute()), ref.minibatch_cka(x_batches, y_batches, unbiased=unbiased), **TOLERANCE
    )


def test_minibatch_cka_batch_size_bias(rng):
    x, y = related_pair(rng, 2048, 16, 12, noise=2.0)
    batch_size = 8
    results = {}
    for unbiased in (False, True):
        metric = MinibatchCKA(unbiased=unbiased)
        for x_batch, y_batch in zip(split_batches(x, batch_size), split_batches(y, batch_size), strict=True):
            metric.update(x_batch, y_batch)
        results[unbiased] = (as_float(metric.compute()), as_float(linear_cka(x, y, unbiased=unbiased)))
    unbiased_minibatch, unbiased_full = results[True]
    biased_minibatch, biased_full = results[False]
    # With batches of 8 the biased per-batch HSIC is far off, while the unbiased terms average out.
    assert abs(unbiased_minibatch - unbiased_full) < 0.05
    assert biased_minibatch - biased_full > 0.2


def test_minibatch_cka_reset_and_errors(rng):
    x, y = related_pair(rng, 40, 6, 5)
    metric = MinibatchCKA()
    with pytest.raises(RuntimeError, match="needs at least one update"):
        metric.compute()
    metric.update(x[:20], y[:20])
    with pytest.raises(ValueError, match=r"widths \(6, 4\) but earlier batches had \(6, 5\)"):
        metric.update(x[20:], y[20:, :4])
    bad = x[20:].copy()
    bad[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="x contains 1 non-finite"):
        metric.update(bad, y[20:])
    assert metric.num_batches == 1
    np.testing.assert_allclose(as_float(metric.compute()), as_float(linear_cka(x[:20], y[:20])), **TOLERANCE)

    metric.reset()
    assert metric.num_batches == 0
    with pytest.raises(RuntimeError):
        metric.compute()
    metric.update(x[20:], y[20:, :4])
    np.testing.assert_allclose(as_float(metric.compute()), as_float(linear_cka(x[20:], y[20:, :4])), **TOLERANCE)

    unbiased_metric = MinibatchCKA(unbiased=True)
    with pytest.raises(ValueError, match="needs at least 4 examples"):
        unbiased_metric.update(x[:3], y[:3])


def test_minibatch_cka_constant_batches_give_nan(rng):
    x, _ = related_pair(rng, 40, 6, 5)
    metric = MinibatchCKA()
    metric.update(x[:20], np.zeros((20, 3)))
    metric.update(x[20:], np.ones((20, 3)))
    with pytest.warns(ConstantInputWarning, match="y is constant") as record:
        assert math.isnan(as_float(metric.compute()))
    assert record[0].filename == __file__


# ---------------------------------------------------------------------------------------------------------------------
# SVCCA and PWCCA


@pytest.mark.parametrize(("keep_variance", "num_components"), [(0.99, None), (0.8, None), (1.0, None), (0.5, 4)])
def test_svcca_matches_reference(rng, keep_variance, num_components):
    x, y = related_pair(rng, 120, 14, 9)
    x = x * np.linspace(0.1, 3.0, 14)  # uneven variances, so the truncation matters
    result = svcca(x, y, keep_variance=keep_variance, num_components=num_components)
    expected = ref.svcca(x, y, keep_variance=keep_variance, num_components=num_components)
    np.testing.assert_allclose(as_float(result), expected, **TOLERANCE)


def test_svcca_untruncated_invertible_invariance(rng):
    x, y = related_pair(rng, 100, 8, 6)
    mapped = x @ ill_conditioned_map(rng, 8) + 5.0
    expected = as_float(svcca(x, y, keep_variance=1.0))
    np.testing.assert_allclose(as_float(svcca(mapped, y, keep_variance=1.0)), expected, rtol=1e-8)
    np.testing.assert_allclose(as_float(svcca(mapped, y, num_components=8)), expected, rtol=1e-8)
    np.testing.assert_allclose(as_float(svcca(x, mapped, keep_variance=1.0)), 1.0, rtol=1e-8)


def test_svcca_truncated_invariances(rng):
    n = 200
    strong = 10.0 * rng.normal(size=(n, 4))
    weak = 0.1 * rng.normal(size=(n, 4))
    x = np.hstack([strong, weak])
    y = weak + 0.01 * rng.normal(size=(n, 4))  # y shares only x's weak directions
    baseline = as_float(svcca(x, y, num_components=4))
    rotated = x @ random_orthogonal(rng, 8) * 2.0
    np.testing.assert_allclose(as_float(svcca(rotated, y, num_components=4)), baseline, **TOLERANCE)
    # Rescaling makes the weak directions dominant, so truncation now keeps what y shares.
    rescaled = x @ np.diag([0.01] * 4 + [100.0] * 4)
    assert baseline < 0.5
    assert as_float(svcca(rescaled, y, num_components=4)) > 0.99


def test_svcca_rejects_too_few_examples(rng):
    x, y = related_pair(rng, 40, 60, 30)
    with pytest.raises(ValueError, match=r"svcca needs .* at most N - 1 = 39 .* more examples, or a smaller num_comp"):
        svcca(x, y)
    with pytest.raises(ValueError, match="x keeps 20 and y keeps 20"):
        svcca(x, y, num_components=20)
    result = as_float(svcca(x, y, num_components=10))
    np.testing.assert_allclose(result, ref.svcca(x, y, num_components=10), **TOLERANCE)
    assert result < 1.0


def test_svcca_clamps_num_components_to_rank(rng):
    x, y = related_pair(rng, 100, 6, 6)
    low_rank = np.hstack([x[:, :3], x[:, :3] @ rng.normal(size=(3, 5))])  # rank 3, width 8
    np.testing.assert_allclose(
        as_float(svcca(low_rank, y, num_components=6)), ref.canonical_correlations(x[:, :3], y).mean(), **TOLERANCE
    )


def test_svcca_rejects_bad_options(rng):
    x, y = related_pair(rng, 50, 5, 5)
    for keep_variance in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep_variance must be in"):
            svcca(x, y, keep_variance=keep_variance)
    with pytest.raises(ValueError, match="num_components must be at least 1"):
        svcca(x, y, num_components=0)


def test_pwcca_is_asymmetric(rng):
    x, y = related_pair(rng, 150, 10, 6)
    forward = as_float(pwcca(x, y))
    backward = as_float(pwcca(y, x))
    np.testing.assert_allclose(backward, ref.pwcca(y, x), **TOLERANCE)
    assert abs(forward - backward) > 1e-3


def test_pwcca_invariances(rng):
    x, y = related_pair(rng, 150, 10, 6)
    expected = as_float(pwcca(x, y))
    # Any invertible map of y, and translation, scaling, permutation and sign flips of x's neurons.
    np.testing.assert_allclose(as_float(pwcca(x, y @ ill_conditioned_map(rng, 6) - 3.0)), expected, rtol=1e-8)
    permuted = -4.0 * x[:, rng.permutation(10)] + 7.0
    np.testing.assert_allclose(as_float(pwcca(permuted, y)), expected, rtol=1e-8)


def test_pwcca_x_map_changes_score(rng):
    x, y = related_pair(rng, 150, 10, 6)
    expected = as_float(pwcca(x, y))
    mapped = x @ ill_conditioned_map(rng, 10)
    result = as_float(pwcca(mapped, y))
    np.testing.assert_allclose(result, ref.pwcca(mapped, y), **TOLERANCE)
    assert abs(result - expected) > 1e-2


def test_pwcca_rejects_too_few_examples(rng):
    x, y = related_pair(rng, 40, 30, 20)
    with pytest.raises(ValueError, match="pwcca needs .* x keeps 30 and y keeps 20. Otherwise at least 11 canonical"):
        pwcca(x, y)
    # Same widths with enough examples.
    x, y = related_pair(rng, 51, 30, 20)
    np.testing.assert_allclose(as_float(pwcca(x, y)), ref.pwcca(x, y), **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# Procrustes


@pytest.mark.parametrize(("n", "width_x", "width_y"), [(60, 8, 5), (20, 50, 35), (20, 5, 50)])
def test_procrustes_matches_reference(rng, n, width_x, width_y):
    x, y = related_pair(rng, n, width_x, width_y)
    result = procrustes(x, y)
    assert isinstance(result, ProcrustesResult)
    similarity, angular_distance = result
    expected_similarity, expected_distance = ref.procrustes(x, y)
    np.testing.assert_allclose(as_float(similarity), expected_similarity, **TOLERANCE)
    np.testing.assert_allclose(as_float(angular_distance), expected_distance, **TOLERANCE)
    np.testing.assert_allclose(as_float(angular_distance), math.acos(as_float(similarity)), **TOLERANCE)


def test_procrustes_invariances(rng):
    x, y = related_pair(rng, 60, 8, 5)
    expected = procrustes(x, y)
    transformed = 0.3 * x @ random_orthogonal(rng, 8) - 9.0
    result = procrustes(transformed, y)
    np.testing.assert_allclose(as_float(result.similarity), as_float(expected.similarity), **TOLERANCE)
    self_result = procrustes(x, transformed)
    np.testing.assert_allclose(as_float(self_result.similarity), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(as_float(self_result.angular_distance), 0.0, rtol=0, atol=1e-6)
    mapped = x @ ill_conditioned_map(rng, 8)
    assert as_float(procrustes(x, mapped).similarity) < 0.9


def test_procrustes_constant_input_nan(rng):
    x, _ = related_pair(rng, 30, 5, 5)
    with pytest.warns(ConstantInputWarning, match="procrustes: x is constant"):
        similarity, angular_distance = procrustes(np.ones((30, 4)), x)
    assert math.isnan(as_float(similarity))
    assert math.isnan(as_float(angular_distance))


# ---------------------------------------------------------------------------------------------------------------------
# Mutual k-NN


@pytest.mark.parametrize("k", [1, 5, 29])
def test_mutual_knn_matches_reference(rng, k):
    x, y = related_pair(rng, 30, 6, 9, noise=0.5)
    result = as_float(mutual_knn(x, y, k=k))
    np.testing.assert_allclose(result, ref.mutual_knn(x, y, k=k), **TOLERANCE)
    assert 0.0 <= result <= 1.0


def test_mutual_knn_all_neighbours_one(rng):
    x, y = related_pair(rng, 30, 6, 9)
    np.testing.assert_allclose(as_float(mutual_knn(x, y, k=29)), 1.0)


def test_mutual_knn_invariances(rng):
    x, y = related_pair(rng, 50, 6, 9, noise=0.5)
    expected = as_float(mutual_knn(x, y, k=5))
    rotated = 2.5 * x @ random_orthogonal(rng, 6)
    np.testing.assert_allclose(as_float(mutual_knn(rotated, y, k=5)), expected, **TOLERANCE)
    # Cosine similarity of uncentred data changes under translation.
    assert as_float(mutual_knn(x + 10.0 * rng.normal(size=6), x, k=5)) < 0.9


def test_mutual_knn_rejects_bad_k(rng):
    x, y = related_pair(rng, 30, 6, 9)
    for k in (0, 30):
        with pytest.raises(ValueError, match=r"k must be between 1 and N - 1 = 29 for N = 30 examples"):
            mutual_knn(x, y, k=k)


def test_measures_no_warning_normal_input(rng):
    x, y = related_pair(rng, 80, 12, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for measure, _ in SCALAR_MEASURES.values():
            measure(x, y)
        linear_cka_matrix([x, y], unbiased=True)
        procrustes(x, y)
