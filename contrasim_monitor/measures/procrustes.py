"""Orthogonal Procrustes similarity and the angular Procrustes distance."""

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


class ProcrustesResult(NamedTuple):
    """Result of `procrustes`, a pair of 0-dim float64 tensors that unpacks as ``similarity, angular_distance``."""

    similarity: torch.Tensor
    """Nuclear norm ||X^T Y||_* of the centred, Frobenius-normalised inputs, in [0, 1]."""
    angular_distance: torch.Tensor
    """arccos(similarity) in radians, in [0, pi / 2]."""


def _reduce_width(x: torch.Tensor) -> torch.Tensor:
    """Return an (N, min(N, D)) matrix with the same Gram X X^T as the (N, D) matrix `x`.

    Singular values of X^T Y depend on X only through X X^T, so a wide X can be replaced by R^T from the QR
    decomposition X^T = Q R. This keeps the product X^T Y and its SVD at most N x N.
    """
    num_examples, width = x.shape
    if width <= num_examples:
        return x
    return torch.linalg.qr(x.T, mode="r").R.T


def procrustes(x: MatrixLike, y: MatrixLike) -> ProcrustesResult:
    """Compare two representations by orthogonal Procrustes alignment.

    Both inputs are centred and scaled to unit Frobenius norm. The best orthogonal map R (a partial isometry when the
    widths differ) gives min_R ||X R - Y||_F^2 = 2 - 2 ||X^T Y||_*, so the nuclear norm ||X^T Y||_* is the similarity.
    Its arccos is the angular Procrustes distance of Williams et al. (2021, "Generalized Shape Metrics on Neural
    Representations"), a metric. Both are symmetric in x and y and invariant to orthogonal maps, isotropic scaling and
    translation of either input, but not to general invertible linear maps.

    Args:
        x: (N, D_x) activations, a torch tensor or numpy array of any real dtype, on any device.
        y: (N, D_y) activations of the same N examples. D_y may differ from D_x.

    Returns:
        ProcrustesResult(similarity, angular_distance) of 0-dim float64 tensors on the device of the first torch
        tensor argument. Both are NaN, with a ConstantInputWarning, if x or y is constant across examples.

    Raises:
        ValueError: If an input is not 2-D or the example counts differ.
        NonFiniteError: If an input contains NaN or inf.
    """
    device = resolve_device([x, y])
    x_matrix = as_float64_matrix(x, "x", device)
    y_matrix = as_float64_matrix(y, "y", device)
    check_same_examples(x_matrix, "x", y_matrix, "y")
    constant_names = [name for name, matrix in (("x", x_matrix), ("y", y_matrix)) if is_constant(matrix)]
    if constant_names:
        warn_constant("procrustes", constant_names, stacklevel=3)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        return ProcrustesResult(nan, nan.clone())

    x_centred = centre(x_matrix, False)
    y_centred = centre(y_matrix, False)
    x_normalised = _reduce_width(x_centred / torch.linalg.matrix_norm(x_centred))
    y_normalised = _reduce_width(y_centred / torch.linalg.matrix_norm(y_centred))
    # By Cauchy-Schwarz the nuclear norm is at most 1. The clamp removes rounding above 1, which arccos maps to NaN.
    similarity = torch.linalg.svdvals(x_normalised.T @ y_normalised).sum().clamp(0.0, 1.0)
    return ProcrustesResult(similarity, torch.arccos(similarity))
