"""Mutual k-nearest-neighbour alignment of two representations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import MatrixLike, as_float64_matrix, check_same_examples, is_constant, resolve_device, warn_constant


def _nearest_neighbours(x: torch.Tensor, k: int) -> torch.Tensor:
    """Return the (N, k) indices of each row's k most cosine-similar other rows of the (N, D) matrix `x`."""
    normalised = F.normalize(x, dim=1)
    similarity = normalised @ normalised.T
    similarity.fill_diagonal_(-math.inf)
    return similarity.topk(k, dim=1).indices


def mutual_knn(x: MatrixLike, y: MatrixLike, k: int = 10) -> torch.Tensor:
    """Compute the mean fraction of shared k nearest neighbours between two representations.

    For every example i, the k nearest other examples by cosine similarity are found in x and in y, and the score is
    the mean over i of |knn_x(i) ∩ knn_y(i)| / k, the mutual k-NN alignment of Huh et al. (2024, "The Platonic
    Representation Hypothesis"). An example is never its own neighbour. The inputs are not centred, so the score is
    symmetric and invariant to orthogonal maps and positive scaling of either input, but not to translation.

    NOTE: ties in cosine similarity (duplicate rows, or an all-zero row, whose similarity to everything is 0) are
    broken in an unspecified order by `torch.topk`, so such inputs can give slightly different scores across devices.

    Args:
        x: (N, D_x) activations, a torch tensor or numpy array of any real dtype, on any device.
        y: (N, D_y) activations of the same N examples.
        k: Number of neighbours per example, from 1 to N - 1.

    Returns:
        0-dim float64 tensor in [0, 1] on the device of the first torch tensor argument. NaN, with a
        ConstantInputWarning, if x or y is constant across examples, because all neighbours are then tied.

    Raises:
        ValueError: If an input is not 2-D, the example counts differ, or k is outside [1, N - 1].
        NonFiniteError: If an input contains NaN or inf.
    """
    device = resolve_device([x, y])
    x_matrix = as_float64_matrix(x, "x", device)
    y_matrix = as_float64_matrix(y, "y", device)
    check_same_examples(x_matrix, "x", y_matrix, "y")
    num_examples = x_matrix.shape[0]
    if not 1 <= k <= num_examples - 1:
        raise ValueError(f"k must be between 1 and N - 1 = {num_examples - 1} for N = {num_examples} examples, got {k}")
    constant_names = [name for name, matrix in (("x", x_matrix), ("y", y_matrix)) if is_constant(matrix)]
    if constant_names:
        warn_constant("mutual_knn", constant_names, stacklevel=3)
        return torch.tensor(math.nan, dtype=torch.float64, device=device)

    neighbours_x = _nearest_neighbours(x_matrix, k)
    neighbours_y = _nearest_neighbours(y_matrix, k)
    is_neighbour_x = torch.zeros((num_examples, num_examples), dtype=torch.bool, device=device)
    is_neighbour_x.scatter_(1, neighbours_x, True)
    shared = is_neighbour_x.gather(1, neighbours_y).sum(dim=1)
    return shared.to(torch.float64).mean() / k
