"""Linear centred kernel alignment (CKA) in functional, all-pairs matrix and mini-batch form.

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited") compares two
representations through their linear Grams K = X X^T and L = Y Y^T:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Two HSIC estimators are available. With H = I - 11^T / n the centring matrix:

- biased (Gretton et al. 2005): HSIC_0(K, L) = tr(K H L H) / (n - 1)^2. For centred features Xc, Yc this equals
  <Xc Xc^T, Yc Yc^T>_F / (n - 1)^2 = ||Yc^T Xc||_F^2 / (n - 1)^2.
- unbiased (Song et al. 2012, U-statistic): with K~ and L~ the Grams with their diagonals set to zero,
  HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2)) - 2 / (n - 2) 1^T K~ L~ 1] / (n (n - 3)).
  It is unchanged when X is translated, so it is computed from centred features, which avoids cancellation.

Both estimators come from the same per-input statistics, computed once per input: the centred features or the
centred Gram, and for the unbiased estimator the Gram's diagonal and the row sums of K~. See `_hsic_all_pairs`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._common import (
    MatrixLike,
    as_float64_matrix,
    centre,
    check_same_examples,
    is_constant,
    resolve_device,
    warn_constant,
)

# Upper bound on the memory that the stacked (N, N) Grams of the Gram form may take. Above it the feature form is used
# even where it needs more arithmetic, because its memory grows with the feature widths instead of N^2.
_GRAM_MEMORY_LIMIT_BYTES = 1 << 30

_MIN_EXAMPLES_UNBIASED = 4


class _KernelStatistics(NamedTuple):
    """Per-input quantities from which HSIC between any two inputs follows."""

    # Gram form: (L, N, N) stacked centred Grams Xc Xc^T. Feature form: L centred (N, D_i) feature matrices.
    kernels: torch.Tensor | list[torch.Tensor]
    # (L, N) diagonals of the centred Grams, only for the unbiased estimator.
    diagonals: torch.Tensor | None
    # (L, N) row sums K~ 1 of the centred Grams with zeroed diagonal, only for the unbiased estimator.
    row_sums: torch.Tensor | None


def _use_gram_form(num_examples: int, widths_a: list[int], widths_b: list[int] | None) -> bool:
    """Decide between the (N, N) Gram form and the (D_a, D_b) feature-covariance form by counting multiply-adds.

    The Gram form costs N^2 D per input to build the Grams plus N^2 per pair. The feature form costs N D_a D_b per
    pair, ||Yc^T Xc||_F^2, and N D^2 per self-term. For one pair of equal widths D this picks the Gram form when N is
    below about 1.5 D. For a matrix of many layers the Gram form wins up to larger N, because each extra pair costs
    only N^2. `widths_b` is None for the symmetric matrix of `widths_a` against itself.
    """
    n = num_examples
    if widths_b is None:
        num_inputs = len(widths_a)
        num_products = num_inputs * (num_inputs + 1) // 2
        width_sum = sum(widths_a)
        feature_cost = n * (width_sum**2 + sum(d * d for d in widths_a)) // 2
        gram_cost = n * n * (width_sum + num_products)
    else:
        num_inputs = len(widths_a) + len(widths_b)
        num_products = len(widths_a) * len(widths_b) + num_inputs
        feature_cost = n * (sum(widths_a) * sum(widths_b) + sum(d * d for d in widths_a + widths_b))
        gram_cost = n * n * (sum(widths_a) + sum(widths_b) + num_products)
    gram_bytes = num_inputs * n * n * 8
    return gram_cost <= feature_cost and gram_bytes <= _GRAM_MEMORY_LIMIT_BYTES


def _kernel_statistics(features: list[torch.Tensor], use_gram: bool, unbiased: bool) -> _KernelStatistics:
    """Compute the per-input HSIC statistics of centred (N, D_i) feature matrices."""
    kernels: torch.Tensor | list[torch.Tensor] = features
    if use_gram:
        n = features[0].shape[0]
        grams = features[0].new_empty((len(features), n, n))
        for index, feature in enumerate(features):
            torch.mm(feature, feature.T, out=grams[index])
        kernels = grams

    if not unbiased:
        return _KernelStatistics(kernels, None, None)

    diagonals = torch.stack([feature.square().sum(dim=1) for feature in features])
    # K 1 = Xc (Xc^T 1), which is zero up to rounding for centred features. It is computed rather than assumed, so the
    # statistic matches the Gram it describes.
    row_sums = torch.stack([feature @ feature.sum(dim=0) for feature in features]) - diagonals
    return _KernelStatistics(kernels, diagonals, row_sums)


def _mirror_upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """Return the symmetric matrix whose upper triangle, diagonal included, is that of `matrix`."""
    return torch.triu(matrix) + torch.triu(matrix, diagonal=1).T


def _frobenius_products(stats_a: _KernelStatistics, stats_b: _KernelStatistics | None) -> torch.Tensor:
    """Compute <K_i, L_j>_F for every input i of `stats_a` and j of `stats_b`, as an (L_a, L_b) matrix.

    `stats_b` None means `stats_a` against itself: then only the upper triangle is computed and mirrored, so the
    result is exactly symmetric.
    """
    symmetric = stats_b is None
    if symmetric:
        stats_b = stats_a

    if isinstance(stats_a.kernels, torch.Tensor):
        flat_a = stats_a.kernels.reshape(stats_a.kernels.shape[0], -1)
        flat_b = stats_b.kernels.reshape(stats_b.kernels.shape[0], -1)
        # One matrix product for all pairs. In the symmetric case it also fills the lower triangle, which costs
        # L^2 N^2 multiply-adds, small next to the L N^2 D of building the Grams.
        products = flat_a @ flat_b.T
        return _mirror_upper_triangle(products) if symmetric else products

    # Feature form: <Xc Xc^T, Yc Yc^T>_F = ||Yc^T Xc||_F^2, a (D_a, D_b) product per pair.
    features_a, features_b = stats_a.kernels, stats_b.kernels
    products = features_a[0].new_zeros((len(features_a), len(features_b)))
    for i, feature_a in enumerate(features_a):
        first_j = i if symmetric else 0
        for j in range(first_j, len(features_b)):
            products[i, j] = (features_b[j].T @ feature_a).square().sum()
    return _mirror_upper_triangle(products) if symmetric else products


def _frobenius_self_products(stats: _KernelStatistics) -> torch.Tensor:
    """Compute <K_i, K_i>_F for every input i, as an (L,) vector."""
    if isinstance(stats.kernels, torch.Tensor):
        return stats.kernels.reshape(stats.kernels.shape[0], -1).square().sum(dim=1)
    return torch.stack([(feature.T @ feature).square().sum() for feature in stats.kernels])


def _hsic_from_sums(
    frobenius: torch.Tensor,
    diagonal_dot: torch.Tensor | None,
    row_sum_dot: torch.Tensor | None,
    total_product: torch.Tensor | None,
    num_examples: int,
    unbiased: bool,
) -> torch.Tensor:
    """Combine the sums that make up HSIC, elementwise.

    Args:
        frobenius: <K, L>_F of the centred Grams, full diagonal included.
        diagonal_dot: sum_i K_ii L_ii, only for the unbiased estimator.
        row_sum_dot: (K~ 1)^T (L~ 1), only for the unbiased estimator.
        total_product: (1^T K~ 1)(1^T L~ 1), only for the unbiased estimator.
        num_examples: N.
        unbiased: Select the unbiased (Song et al. 2012) or the biased (Gretton et al. 2005) estimator.

    Returns:
        HSIC estimates, shaped like `frobenius`.
    """
    n = num_examples
    if not unbiased:
        return frobenius / (n - 1) ** 2
    # tr(K~ L~) is the Frobenius product without the diagonal terms.
    trace_off_diagonal = frobenius - diagonal_dot
    return (trace_off_diagonal + total_product / ((n - 1) * (n - 2)) - 2.0 * row_sum_dot / (n - 2)) / (n * (n - 3))


def _hsic_all_pairs(
    xs: list[torch.Tensor], ys: list[torch.Tensor] | None, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate HSIC between every pair of centred inputs, plus each input's HSIC with itself.

    Both estimators use the same two forms: the Gram form from (N, N) centred Grams, or the feature form from
    ||Yc^T Xc||_F^2 and, for the unbiased estimator, the diagonals and row sums of the Grams computed from the features
    in O(N D). `_use_gram_form` picks the cheaper one.

    Args:
        xs: Centred (N, D_i) float64 tensors.
        ys: Centred (N, D_j) float64 tensors, or None to pair `xs` with itself.
        unbiased: Select the unbiased or the biased estimator.

    Returns:
        (L_x, L_y) cross HSIC, (L_x,) self-HSIC of each x and (L_y,) self-HSIC of each y. With `ys` None, L_y = L_x
        and the last two are the diagonal of the first.
    """
    n = xs[0].shape[0]
    widths_y = None if ys is None else [y.shape[1] for y in ys]
    use_gram = _use_gram_form(n, [x.shape[1] for x in xs], widths_y)
    stats_x = _kernel_statistics(xs, use_gram, unbiased)

    if ys is None:
        frobenius = _frobenius_products(stats_x, None)
        if unbiased:
            totals = stats_x.row_sums.sum(dim=1)
            cross = _hsic_from_sums(
                frobenius,
                stats_x.diagonals @ stats_x.diagonals.T,
                stats_x.row_sums @ stats_x.row_sums.T,
                torch.outer(totals, totals),
                n,
                unbiased,
            )
            cross = _mirror_upper_triangle(cross)
        else:
            cross = _hsic_from_sums(frobenius, None, None, None, n, unbiased)
        self_hsic = cross.diagonal().clone()
        return cross, self_hsic, self_hsic

    stats_y = _kernel_statistics(ys, use_gram, unbiased)
    frobenius = _frobenius_products(stats_x, stats_y)
    self_frobenius_x = _frobenius_self_products(stats_x)
    self_frobenius_y = _frobenius_self_products(stats_y)
    if not unbiased:
        return (
            _hsic_from_sums(frobenius, None, None, None, n, unbiased),
            _hsic_from_sums(self_frobenius_x, None, None, None, n, unbiased),
            _hsic_from_sums(self_frobenius_y, None, None, None, n, unbiased),
        )

    totals_x = stats_x.row_sums.sum(dim=1)
    totals_y = stats_y.row_sums.sum(dim=1)
    cross = _hsic_from_sums(
        frobenius,
        stats_x.diagonals @ stats_y.diagonals.T,
        stats_x.row_sums @ stats_y.row_sums.T,
        torch.outer(totals_x, totals_y),
        n,
        unbiased,
    )
    self_x = _hsic_from_sums(
        self_frobenius_x,
        stats_x.diagonals.square().sum(dim=1),
        stats_x.row_sums.square().sum(dim=1),
        totals_x.square(),
        n,
        unbiased,
    )
    self_y = _hsic_from_sums(
        self_frobenius_y,
        stats_y.diagonals.square().sum(dim=1),
        stats_y.row_sums.square().sum(dim=1),
        totals_y.square(),
        n,
        unbiased,
    )
    return cross, self_x, self_y


def _cka_from_hsic(cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor) -> torch.Tensor:
    """Normalise (L_x, L_y) cross HSIC by the self-terms, with NaN where a self-term is not positive.

    A self-term is exactly zero for a constant input, and the unbiased estimate can be negative for a tiny sample.
    """
    valid = (self_x[:, None] > 0) & (self_y[None, :] > 0)
    denominator = torch.sqrt(torch.where(valid, self_x[:, None] * self_y[None, :], 1.0))
    return torch.where(valid, cross / denominator, math.nan)


def _check_num_examples(num_examples: int, unbiased: bool, name: str) -> None:
    if unbiased and num_examples < _MIN_EXAMPLES_UNBIASED:
        raise ValueError(
            f"the unbiased HSIC estimator needs at least {_MIN_EXAMPLES_UNBIASED} examples, but {name} has "
            f"{num_examples}; pass more examples or use unbiased=False"
        )


def _warn_non_positive_self_hsic(
    measure: str, names: Sequence[str], self_hsic: torch.Tensor, constant: Sequence[bool], stacklevel: int
) -> None:
    """Warn about non-constant inputs whose unbiased self-HSIC estimate is not positive, which makes CKA NaN."""
    non_positive = [
        name
        for name, value, is_const in zip(names, self_hsic.tolist(), constant, strict=True)
        if value <= 0 and not is_const
    ]
    if non_positive:
        warnings.warn(
            f"{measure}: the unbiased HSIC estimate of {', '.join(non_positive)} with itself is not positive, which "
            "can happen with few examples; returning NaN for its entries. Pass more examples or use unbiased=False",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def linear_cka(x: MatrixLike, y: MatrixLike, unbiased: bool = False) -> torch.Tensor:
    """Compute linear CKA between two representations of the same examples.

    CKA is invariant to orthogonal transformations, isotropic scaling and translation of either input, but not to
    general invertible linear maps. It is symmetric in x and y. The biased estimator gives a score in [0, 1]. The
    unbiased one can be slightly negative when the representations are unrelated.

    Args:
        x: (N, D_x) activations, a torch tensor or numpy array of any real dtype, on any device.
        y: (N, D_y) activations of the same N examples. D_y may differ from D_x.
        unbiased: Use the unbiased HSIC estimator of Song et al. (2012), which needs N >= 4, instead of the biased
            estimator of Gretton et al. (2005).

    Returns:
        0-dim float64 tensor on the device of the first torch tensor argument (CPU for numpy inputs). NaN, with a
        ConstantInputWarning, when x or y is constant across examples. NaN, with a RuntimeWarning, when the unbiased
        self-HSIC estimate of an input is not positive.

    Raises:
        ValueError: If an input is not 2-D, the example counts differ, or `unbiased` is set with N < 4.
        NonFiniteError: If an input contains NaN or inf.
    """
    device = resolve_device([x, y])
    x_matrix = as_float64_matrix(x, "x", device)
    y_matrix = as_float64_matrix(y, "y", device)
    check_same_examples(x_matrix, "x", y_matrix, "y")
    _check_num_examples(x_matrix.shape[0], unbiased, "x")

    constant = [is_constant(x_matrix), is_constant(y_matrix)]
    constant_names = [name for name, is_const in zip(("x", "y"), constant, strict=True) if is_const]
    if constant_names:
        warn_constant("linear_cka", constant_names, stacklevel=3)

    cross, self_x, self_y = _hsic_all_pairs([centre(x_matrix, constant[0])], [centre(y_matrix, constant[1])], unbiased)
    if unbiased:
        _warn_non_positive_self_hsic("linear_cka", ["x", "y"], torch.cat([self_x, self_y]), constant, stacklevel=3)
    return _cka_from_hsic(cross, self_x, self_y)[0, 0]


def _validate_layers(
    layers: Sequence[MatrixLike], argument: str, device: torch.device, num_examples: int | None
) -> list[torch.Tensor]:
    """Convert each layer to float64 and check that all of them have `num_examples` rows (the first one's if None)."""
    if len(layers) == 0:
        raise ValueError(f"{argument} must contain at least one (N, D) activation matrix, got an empty sequence")
    matrices = [as_float64_matrix(layer, f"{argument}[{index}]", device) for index, layer in enumerate(layers)]
    reference, reference_name = matrices[0], f"{argument}[0]"
    if num_examples is not None and reference.shape[0] != num_examples:
        raise ValueError(
            f"{reference_name} must have the same number of examples (rows) as xs[0]: expected shape "
            f"({num_examples}, D), got {tuple(reference.shape)}"
        )
    for index, matrix in enumerate(matrices[1:], start=1):
        check_same_examples(reference, reference_name, matrix, f"{argument}[{index}]")
    return matrices


def linear_cka_matrix(
    xs: Sequence[MatrixLike], ys: Sequence[MatrixLike] | None = None, unbiased: bool = False
) -> torch.Tensor:
    """Compute linear CKA between every x and every y.

    Each input's centred Gram (or feature matrix, whichever form is cheaper for these shapes) and its HSIC self-term
    are computed once, not once per pair. Entries equal `linear_cka(xs[i], ys[j], unbiased)` up to float64 rounding.

    Args:
        xs: L_x activation matrices of shape (N, D_i), all for the same N examples. Widths may differ.
        ys: L_y activation matrices of shape (N, D_j), or None to compare `xs` with itself. With None only the upper
            triangle is computed and then mirrored, so the result is exactly symmetric.
        unbiased: Use the unbiased HSIC estimator (needs N >= 4) instead of the biased one.

    Returns:
        (L_x, L_y) float64 tensor on the device of the first torch tensor in `xs` (or in `ys`; CPU if neither has
        one). Rows and columns of constant inputs are NaN, with a single ConstantInputWarning that names them. With
        `ys` None the diagonal is 1 for every other input, unless an unbiased self-term is not positive (NaN).

    Raises:
        ValueError: If a sequence is empty, an input is not 2-D, the example counts differ, or `unbiased` is set with
            N < 4.
        NonFiniteError: If an input contains NaN or inf.
    """
    device = resolve_device([*xs, *(ys if ys is not None else [])])
    x_matrices = _validate_layers(xs, "xs", device, None)
    num_examples = x_matrices[0].shape[0]
    _check_num_examples(num_examples, unbiased, "xs[0]")
    y_matrices = None if ys is None else _validate_layers(ys, "ys", device, num_examples)

    x_names = [f"xs[{index}]" for index in range(len(x_matrices))]
    y_names = [] if y_matrices is None else [f"ys[{index}]" for index in range(len(y_matrices))]
    all_matrices = x_matrices + (y_matrices or [])
    constant = [is_constant(matrix) for matrix in all_matrices]
    constant_names = [name for name, is_const in zip(x_names + y_names, constant, strict=True) if is_const]
    if constant_names:
        warn_constant("linear_cka_matrix", constant_names, stacklevel=3)

    centred = [centre(matrix, is_const) for matrix, is_const in zip(all_matrices, constant, strict=True)]
    x_centred = centred[: len(x_matrices)]
    y_centred = None if y_matrices is None else centred[len(x_matrices) :]
    cross, self_x, self_y = _hsic_all_pairs(x_centred, y_centred, unbiased)
    if unbiased:
        self_all = self_x if y_matrices is None else torch.cat([self_x, self_y])
        _warn_non_positive_self_hsic("linear_cka_matrix", x_names + y_names, self_all, constant, stacklevel=3)

    cka = _cka_from_hsic(cross, self_x, self_y)
    if y_matrices is None:
        # cross[i, i] / sqrt(cross[i, i]^2) can round to 1 - 2^-53, so write the exact value for valid entries.
        diagonal = cka.diagonal()
        diagonal.copy_(torch.where(torch.isnan(diagonal), diagonal, 1.0))
    return cka


class MinibatchCKA:
    """Linear CKA accumulated over mini-batches of the same two representations.

    Each `update` adds one batch's HSIC(X_b, Y_b), HSIC(X_b, X_b) and HSIC(Y_b, Y_b) to float64 running sums, and
    `compute` divides once:

        sum_b HSIC(X_b, Y_b) / sqrt(sum_b HSIC(X_b, X_b) * sum_b HSIC(Y_b, Y_b)).

    This is the mini-batch CKA of Nguyen, Raghu and Kornblith (2021, "Do Wide and Deep Networks Learn the Same
    Things?"). Every batch counts equally, whatever its size. It never averages per-batch CKA values.

    What it reproduces:

    - With one batch it equals `linear_cka` on that batch, for either estimator.
    - With several batches it is not the full-batch CKA of the concatenated examples, because each batch is centred
      on its own. With `unbiased=True` each batch term is an unbiased estimate of the population HSIC, so the ratio
      converges to the population CKA whatever the batch size. With the biased estimator each term carries a bias of
      order 1/batch size, so the result depends on the batch size.

    Batches must have the same feature widths as the first one. Call `reset` before switching to other layers.

    Args:
        unbiased: Use the unbiased HSIC estimator (each batch needs N >= 4) instead of the biased one.
    """

    def __init__(self, unbiased: bool = False) -> None:
        self.unbiased = unbiased
        self.reset()

    def reset(self) -> None:
        """Clear the running sums and the recorded feature widths."""
        self._cross_sum: torch.Tensor | None = None
        self._self_x_sum: torch.Tensor | None = None
        self._self_y_sum: torch.Tensor | None = None
        self._widths: tuple[int, int] | None = None
        self.num_batches = 0

    def update(self, x: MatrixLike, y: MatrixLike) -> None:
        """Add one mini-batch.

        Args:
            x: (N, D_x) activations of one batch.
            y: (N, D_y) activations of the same N examples from the other representation.

        Raises:
            ValueError: If an input is not 2-D, the example counts differ, the widths differ from earlier batches,
                or `unbiased` is set with N < 4.
            NonFiniteError: If an input contains NaN or inf. The running sums are then left unchanged.
        """
        device = self._cross_sum.device if self._cross_sum is not None else resolve_device([x, y])
        x_matrix = as_float64_matrix(x, "x", device)
        y_matrix = as_float64_matrix(y, "y", device)
        check_same_examples(x_matrix, "x", y_matrix, "y")
        _check_num_examples(x_matrix.shape[0], self.unbiased, "x")
        widths = (x_matrix.shape[1], y_matrix.shape[1])
        if self._widths is not None and widths != self._widths:
            raise ValueError(
                f"x and y have widths {widths} but earlier batches had {self._widths}; call reset() before "
                "accumulating other layers"
            )

        x_centred = centre(x_matrix, is_constant(x_matrix))
        y_centred = centre(y_matrix, is_constant(y_matrix))
        cross, self_x, self_y = _hsic_all_pairs([x_centred], [y_centred], self.unbiased)
        if self._cross_sum is None:
            self._cross_sum = cross[0, 0]
            self._self_x_sum = self_x[0]
            self._self_y_sum = self_y[0]
            self._widths = widths
        else:
            self._cross_sum = self._cross_sum + cross[0, 0]
            self._self_x_sum = self._self_x_sum + self_x[0]
            self._self_y_sum = self._self_y_sum + self_y[0]
        self.num_batches += 1

    def compute(self) -> torch.Tensor:
        """Return the accumulated CKA as a 0-dim float64 tensor on the device of the first batch.

        Returns NaN with a ConstantInputWarning if x or y was constant within every batch, and NaN with a
        RuntimeWarning if an unbiased self-term sum is otherwise not positive.

        Raises:
            RuntimeError: If no batch was added since construction or the last `reset`.
        """
        if self._cross_sum is None:
            raise RuntimeError("MinibatchCKA.compute() needs at least one update() since construction or reset()")
        names = [name for name, total in (("x", self._self_x_sum), ("y", self._self_y_sum)) if float(total) == 0.0]
        if names:
            warn_constant("MinibatchCKA.compute", names, stacklevel=3)
        elif self.unbiased:
            self_sums = torch.stack([self._self_x_sum, self._self_y_sum])
            _warn_non_positive_self_hsic("MinibatchCKA.compute", ["x", "y"], self_sums, [False, False], stacklevel=3)
        cka = _cka_from_hsic(self._cross_sum.reshape(1, 1), self._self_x_sum.reshape(1), self._self_y_sum.reshape(1))
        return cka[0, 0]
