"""Canonical correlation analysis (CCA) measures: SVCCA and projection-weighted CCA.

Both work on centred data. The canonical correlations of X and Y are the singular values of Ux^T Uy, where Ux and Uy
are orthonormal bases of the column spaces of the centred inputs, taken from their thin SVDs.

Sample-size rule: centred data live in an (N - 1)-dimensional space. When the two kept subspaces have dimensions
r_x + r_y > N - 1 they must intersect, so at least r_x + r_y - (N - 1) canonical correlations equal 1 whatever the
data. Both measures raise ValueError in that case instead of returning an inflated score. For example, an untruncated
input with N <= D already spans all N - 1 dimensions, so it would correlate perfectly with anything.
"""

from __future__ import annotations

import math
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


class _CentredSVD(NamedTuple):
    """Thin SVD Xc = U diag(S) Vh of centred data, truncated to its numerical rank r."""

    left: torch.Tensor  # (N, r) orthonormal columns
    singular_values: torch.Tensor  # (r,) in descending order
    right_transposed: torch.Tensor  # (r, D)


def _centred_svd(x: torch.Tensor) -> _CentredSVD:
    """Compute the thin SVD of centred (N, D) data and drop directions below numerical rank.

    The tolerance is that of `numpy.linalg.matrix_rank`: S_max * max(N, D) * float64 machine epsilon.
    """
    left, singular_values, right_transposed = torch.linalg.svd(x, full_matrices=False)
    tolerance = singular_values[0] * max(x.shape) * torch.finfo(torch.float64).eps
    rank = int((singular_values > tolerance).sum())
    return _CentredSVD(left[:, :rank], singular_values[:rank], right_transposed[:rank])


def _prepare_pair(measure: str, x: MatrixLike, y: MatrixLike) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate and centre x and y, or return None after a ConstantInputWarning if either is constant."""
    device = resolve_device([x, y])
    x_matrix = as_float64_matrix(x, "x", device)
    y_matrix = as_float64_matrix(y, "y", device)
    check_same_examples(x_matrix, "x", y_matrix, "y")
    constant_names = [name for name, matrix in (("x", x_matrix), ("y", y_matrix)) if is_constant(matrix)]
    if constant_names:
        warn_constant(measure, constant_names, stacklevel=4)
        return None
    return centre(x_matrix, False), centre(y_matrix, False)


def _check_dimensions(measure: str, num_examples: int, dim_x: int, dim_y: int, remedy: str) -> None:
    """Raise ValueError if the kept subspaces are forced to share directions, see the module docstring."""
    available = num_examples - 1
    if dim_x + dim_y > available:
        forced = dim_x + dim_y - available
        raise ValueError(
            f"{measure} needs the kept dimensions of x and y to total at most N - 1 = {available} (N = {num_examples} "
            f"examples, minus 1 for centring), but x keeps {dim_x} and y keeps {dim_y}. Otherwise at least {forced} "
            f"canonical correlations are 1 whatever the data. {remedy}"
        )


def _canonical_correlations(basis_x: torch.Tensor, basis_y: torch.Tensor) -> torch.Tensor:
    """Return the min(r_x, r_y) canonical correlations between orthonormal (N, r_x) and (N, r_y) bases."""
    return torch.linalg.svdvals(basis_x.T @ basis_y).clamp(0.0, 1.0)


def _num_kept_components(svd: _CentredSVD, keep_variance: float, num_components: int | None) -> int:
    """Return how many leading singular directions to keep, at most the numerical rank."""
    rank = svd.singular_values.shape[0]
    if num_components is not None:
        return min(num_components, rank)
    variance = svd.singular_values.square()
    explained = torch.cumsum(variance, dim=0) / variance.sum()
    # The small slack keeps keep_variance=1.0 from failing on a cumulative sum that rounds to 1 - 1e-16.
    return min(int((explained < keep_variance - 1e-12).sum()) + 1, rank)


def svcca(x: MatrixLike, y: MatrixLike, keep_variance: float = 0.99, num_components: int | None = None) -> torch.Tensor:
    """Compute SVCCA (Raghu et al. 2017): SVD-truncate each centred input, then average the canonical correlations.

    Each side keeps its leading singular directions: the fewest that explain at least `keep_variance` of its variance,
    or exactly `num_components` (fewer if the input's numerical rank is lower). The score is the mean of the
    min(k_x, k_y) canonical correlations between the kept subspaces, in [0, 1]. It is symmetric in x and y.

    Invariances: with truncation, SVCCA is invariant to orthogonal maps, isotropic scaling and translation of either
    input. It is invariant to every invertible linear map only when nothing is truncated (`keep_variance=1.0`, or
    `num_components` at least the width), because a non-orthogonal map changes which directions carry the variance.

    Args:
        x: (N, D_x) activations, a torch tensor or numpy array of any real dtype, on any device.
        y: (N, D_y) activations of the same N examples.
        keep_variance: Fraction of variance in (0, 1] that each side keeps. Ignored when `num_components` is set.
        num_components: Number of singular directions that each side keeps, at least 1.

    Returns:
        0-dim float64 tensor on the device of the first torch tensor argument. NaN, with a ConstantInputWarning, if x
        or y is constant across examples.

    Raises:
        ValueError: If an input is not 2-D, the example counts differ, an option is out of range, or
            k_x + k_y > N - 1, which forces canonical correlations of 1 (see the module docstring). This never
            truncates further on its own: pass more examples or a smaller `num_components` or `keep_variance`.
        NonFiniteError: If an input contains NaN or inf.
    """
    if not 0.0 < keep_variance <= 1.0:
        raise ValueError(f"keep_variance must be in (0, 1], got {keep_variance}")
    if num_components is not None and num_components < 1:
        raise ValueError(f"num_components must be at least 1 or None, got {num_components}")
    pair = _prepare_pair("svcca", x, y)
    if pair is None:
        return torch.tensor(math.nan, dtype=torch.float64, device=resolve_device([x, y]))
    x_centred, y_centred = pair

    svd_x = _centred_svd(x_centred)
    svd_y = _centred_svd(y_centred)
    kept_x = _num_kept_components(svd_x, keep_variance, num_components)
    kept_y = _num_kept_components(svd_y, keep_variance, num_components)
    _check_dimensions(
        "svcca",
        x_centred.shape[0],
        kept_x,
        kept_y,
        "Pass more examples, or a smaller num_components or keep_variance.",
    )
    # The kept data U_k diag(S_k) span the same subspace as U_k, so U_k serves as the orthonormal basis for CCA.
    correlations = _canonical_correlations(svd_x.left[:, :kept_x], svd_y.left[:, :kept_y])
    return correlations.mean()


def pwcca(x: MatrixLike, y: MatrixLike) -> torch.Tensor:
    """Compute projection-weighted CCA (Morcos et al. 2018) of x against y.

    With canonical correlations rho_i and the matching unit-norm canonical variates h_i = Xc a_i of x, the score is
    sum_i alpha_i rho_i, where alpha_i is proportional to sum_j |<h_i, x_j>| over the centred neurons (columns) x_j of
    x, normalised to sum to 1. Only the min(r_x, r_y) paired directions count, r being the numerical rank.

    The weights come from x, so pwcca(x, y) differs from pwcca(y, x) in general. The score is invariant to
    translation and isotropic scaling of either input, to any invertible linear map of y, and to permuting or
    flipping the signs of x's neurons. It is not invariant to general invertible or orthogonal maps of x, because
    those change the neurons that the weights are measured against.

    Args:
        x: (N, D_x) activations whose neurons set the weights.
        y: (N, D_y) activations of the same N examples.

    Returns:
        0-dim float64 tensor in [0, 1] on the device of the first torch tensor argument. NaN, with a
        ConstantInputWarning, if x or y is constant across examples.

    Raises:
        ValueError: If an input is not 2-D, the example counts differ, or r_x + r_y > N - 1, which forces canonical
            correlations of 1 (see the module docstring). This never truncates on its own: pass more examples, or
            reduce the widths first.
        NonFiniteError: If an input contains NaN or inf.
    """
    pair = _prepare_pair("pwcca", x, y)
    if pair is None:
        return torch.tensor(math.nan, dtype=torch.float64, device=resolve_device([x, y]))
    x_centred, y_centred = pair

    svd_x = _centred_svd(x_centred)
    svd_y = _centred_svd(y_centred)
    rank_x = svd_x.singular_values.shape[0]
    rank_y = svd_y.singular_values.shape[0]
    _check_dimensions(
        "pwcca",
        x_centred.shape[0],
        rank_x,
        rank_y,
        "Pass more examples, or reduce the widths first, for example by keeping the leading principal components.",
    )

    # SVD of Ux^T Uy: the left singular vectors give x's canonical directions in the basis Ux, h_i = Ux u_i.
    directions_x, correlations, _ = torch.linalg.svd(svd_x.left.T @ svd_y.left, full_matrices=False)
    num_pairs = min(rank_x, rank_y)
    directions_x = directions_x[:, :num_pairs]
    correlations = correlations[:num_pairs].clamp(0.0, 1.0)

    # <h_i, x_j> = (u_i^T Ux^T Xc)_j, and Ux^T Xc = diag(S) Vh, so no (N, D_x) product is needed.
    projections = directions_x.T @ (svd_x.singular_values[:, None] * svd_x.right_transposed)
    weights = projections.abs().sum(dim=1)
    weights = weights / weights.sum()
    return (weights * correlations).sum()
