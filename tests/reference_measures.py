"""Float64 numpy reference implementations of the similarity measures, used only by the tests.

Each follows the published formula directly and, where possible, by a different route from the library code:
HSIC through explicit centring matrices on uncentred Grams, CCA through whitened covariance matrices, Procrustes
through the explicit optimal rotation, and k-NN through sorting and Python sets. They are slow and meant for small
inputs only.
"""

from __future__ import annotations

import numpy as np


def centring_matrix(n: int) -> np.ndarray:
    """Return H = I - 11^T / n, shape (n, n)."""
    return np.eye(n) - np.full((n, n), 1.0 / n)


def hsic_biased(gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    """Biased HSIC of Gretton et al. (2005): tr(K H L H) / (n - 1)^2."""
    n = gram_x.shape[0]
    h = centring_matrix(n)
    return float(np.trace(gram_x @ h @ gram_y @ h)) / (n - 1) ** 2


def hsic_unbiased(gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    """Unbiased HSIC of Song et al. (2012), computed on Grams with zeroed diagonals."""
    n = gram_x.shape[0]
    k = gram_x.copy()
    l = gram_y.copy()  # noqa: E741 - K and L are the standard names of the two Grams
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    trace_term = np.trace(k @ l)
    product_term = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return float(trace_term + product_term - cross_term) / (n * (n - 3))


def hsic(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """HSIC with linear kernels of raw, uncentred (n, d) data."""
    estimator = hsic_unbiased if unbiased else hsic_biased
    return estimator(x @ x.T, y @ y.T)


def linear_cka(x: np.ndarray, y: np.ndarray, unbiased: bool = False) -> float:
    """Linear CKA of Kornblith et al. (2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    return hsic(x, y, unbiased) / np.sqrt(hsic(x, x, unbiased) * hsic(y, y, unbiased))


def minibatch_cka(x_batches: list[np.ndarray], y_batches: list[np.ndarray], unbiased: bool) -> float:
    """Mini-batch CKA of Nguyen et al. (2021): summed per-batch HSIC over the root of the summed self-terms."""
    cross = sum(hsic(x, y, unbiased) for x, y in zip(x_batches, y_batches, strict=True))
    self_x = sum(hsic(x, x, unbiased) for x in x_batches)
    self_y = sum(hsic(y, y, unbiased) for y in y_batches)
    return cross / np.sqrt(self_x * self_y)


def _inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return eigenvectors @ np.diag(eigenvalues**-0.5) @ eigenvectors.T


def _whitened_cross_covariance(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return Sxx^{-1/2} Sxy Syy^{-1/2}, Sxx^{-1/2} and the centred x. Needs full-rank covariances."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    n = x.shape[0]
    sxx = xc.T @ xc / (n - 1)
    syy = yc.T @ yc / (n - 1)
    sxy = xc.T @ yc / (n - 1)
    whiten_x = _inverse_sqrt(sxx)
    return whiten_x @ sxy @ _inverse_sqrt(syy), whiten_x, xc


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations: singular values of Sxx^{-1/2} Sxy Syy^{-1/2}, min(d_x, d_y) of them."""
    whitened, _, _ = _whitened_cross_covariance(x, y)
    return np.linalg.svd(whitened, compute_uv=False)


def _svd_reduce(x: np.ndarray, keep_variance: float, num_components: int | None) -> np.ndarray:
    """Project centred x onto its leading principal directions, as in Raghu et al. (2017)."""
    xc = x - x.mean(axis=0)
    _, singular_values, vh = np.linalg.svd(xc, full_matrices=False)
    if num_components is None:
        explained = np.cumsum(singular_values**2) / np.sum(singular_values**2)
        num_components = int(np.searchsorted(explained, keep_variance - 1e-12) + 1)
    return xc @ vh[:num_components].T


def svcca(x: np.ndarray, y: np.ndarray, keep_variance: float = 0.99, num_components: int | None = None) -> float:
    """SVCCA: mean canonical correlation of the SVD-reduced inputs."""
    x_reduced = _svd_reduce(x, keep_variance, num_components)
    y_reduced = _svd_reduce(y, keep_variance, num_components)
    return float(np.mean(canonical_correlations(x_reduced, y_reduced)))


def pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """Projection-weighted CCA of Morcos et al. (2018), weighted by the neurons of x."""
    whitened, whiten_x, xc = _whitened_cross_covariance(x, y)
    u, correlations, _ = np.linalg.svd(whitened, full_matrices=False)
    num_pairs = min(x.shape[1], y.shape[1])
    weights = np.zeros(num_pairs)
    for i in range(num_pairs):
        variate = xc @ (whiten_x @ u[:, i])
        variate /= np.linalg.norm(variate)
        weights[i] = np.sum(np.abs(variate @ xc))
    weights /= weights.sum()
    return float(np.sum(weights * correlations[:num_pairs]))


def procrustes(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Orthogonal Procrustes similarity 1 - min_R ||X R - Y||_F^2 / 2 and its arccos, with an explicit rotation R.

    The inputs are centred, scaled to unit Frobenius norm and zero-padded to a common width, so R is square.
    """
    width = max(x.shape[1], y.shape[1])
    padded = []
    for matrix in (x, y):
        centred = matrix - matrix.mean(axis=0)
        centred /= np.linalg.norm(centred)
        padded.append(np.pad(centred, ((0, 0), (0, width - matrix.shape[1]))))
    xp, yp = padded
    u, _, vh = np.linalg.svd(xp.T @ yp)
    rotation = u @ vh
    residual = np.linalg.norm(xp @ rotation - yp) ** 2
    similarity = 1.0 - residual / 2.0
    return similarity, float(np.arccos(np.clip(similarity, 0.0, 1.0)))


def _cosine_neighbours(x: np.ndarray, k: int) -> list[set[int]]:
    normalised = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = normalised @ normalised.T
    neighbours = []
    for i in range(x.shape[0]):
        order = [j for j in np.argsort(-similarity[i], kind="stable") if j != i]
        neighbours.append(set(order[:k]))
    return neighbours


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean over examples of the fraction of the k cosine nearest neighbours shared between x and y."""
    neighbours_x = _cosine_neighbours(x, k)
    neighbours_y = _cosine_neighbours(y, k)
    return float(np.mean([len(a & b) / k for a, b in zip(neighbours_x, neighbours_y, strict=True)]))
