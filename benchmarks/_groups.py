"""The group-matching protocol of the multilingual and image-caption benchmarks (Rahamim and Belinkov, NAACL 2024).

Two representations ``anchor`` and ``candidate`` describe the same N examples, row i of one matching row i of the
other: a sentence and its translation, or an image and its caption. The examples are cut into consecutive groups of
``group_size``. For each group, a measure compares the anchor group with the true candidate group and with
``num_distractors`` distractor groups taken from the candidate side. The measure is right on a group when it scores
the true candidate group strictly above every distractor. Accuracy is the fraction of groups it gets right, and a NaN
score anywhere in a group's row counts as wrong.

Distractor groups come in two kinds, as in the reference code (technion-cs-nlp/ContraSim):

- random: each distractor group is ``group_size`` distinct examples drawn uniformly from the examples outside the
  true group. The reference code draws with replacement from all examples, the true group included; excluding it
  makes sure that a distractor never contains a true pair.
- nearest: distractor group j holds, for each member of the true group, its j-th nearest neighbour among the
  candidate examples outside the true group. Distances are Euclidean in the candidate representation, computed with
  ``torch.cdist`` where the reference code uses a FAISS flat L2 index. These distractors look like the true group,
  which makes the task harder.

Examples in one group are compared row by row, so a distractor group is a different pairing even where it shares
examples with another distractor.
"""

from __future__ import annotations

import torch

__all__ = [
    "cka_group_scores",
    "contrasim_group_scores",
    "correct_groups",
    "make_groups",
    "nearest_distractors",
    "random_distractors",
    "ranking_accuracy",
]


def make_groups(num_examples: int, group_size: int) -> torch.Tensor:
    """Cut examples ``0 .. num_examples - 1`` into consecutive groups, dropping an incomplete last group.

    Returns:
        ``(G, group_size)`` long tensor of example indices, ``G = num_examples // group_size``.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    num_groups = num_examples // group_size
    if num_groups == 0:
        raise ValueError(f"{num_examples} examples make no complete group of {group_size}")
    return torch.arange(num_groups * group_size).view(num_groups, group_size)


def random_distractors(
    groups: torch.Tensor, num_examples: int, num_distractors: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw distractor groups of distinct examples, uniformly from the examples outside each true group.

    Returns:
        ``(G, num_distractors, group_size)`` long tensor of example indices.
    """
    num_groups, group_size = groups.shape
    if num_examples - group_size < group_size:
        raise ValueError(
            f"random distractors need at least {group_size} examples outside each group of {group_size}, "
            f"but there are {num_examples} examples in all"
        )
    distractors = torch.empty(num_groups, num_distractors, group_size, dtype=torch.long)
    for index, group in enumerate(groups):
        weights = torch.ones(num_examples)
        weights[group] = 0.0
        distractors[index] = torch.multinomial(
            weights.expand(num_distractors, num_examples), group_size, replacement=False, generator=generator
        )
    return distractors


def nearest_distractors(groups: torch.Tensor, features: torch.Tensor, num_distractors: int) -> torch.Tensor:
    """Build distractor group j from the j-th nearest neighbour of each true member, outside the true group.

    Args:
        groups: ``(G, g)`` example indices.
        features: ``(N, D)`` candidate representations in which distances are measured.
        num_distractors: K, the number of distractor groups per true group.

    Returns:
        ``(G, K, g)`` long tensor of example indices.
    """
    num_examples = features.shape[0]
    num_groups, group_size = groups.shape
    if num_examples - group_size < num_distractors:
        raise ValueError(
            f"nearest distractors need at least {num_distractors} examples outside each group of {group_size}, "
            f"but there are {num_examples} examples in all"
        )
    features = features.to(torch.float64)
    distractors = torch.empty(num_groups, num_distractors, group_size, dtype=torch.long)
    for index, group in enumerate(groups):
        distances = torch.cdist(features[group], features)  # (g, N)
        distances[:, group] = torch.inf
        neighbours = distances.topk(num_distractors, dim=1, largest=False).indices  # (g, K), nearest first
        distractors[index] = neighbours.T
    return distractors


def _with_true_groups(groups: torch.Tensor, distractors: torch.Tensor) -> torch.Tensor:
    """Return ``(G, 1 + K, g)`` candidate indices, the true group first."""
    if distractors.shape[0] != groups.shape[0] or distractors.shape[2] != groups.shape[1]:
        raise ValueError(
            f"distractors must have shape (G, K, g) = ({groups.shape[0]}, K, {groups.shape[1]}), "
            f"got {tuple(distractors.shape)}"
        )
    return torch.cat([groups[:, None], distractors], dim=1)


def contrasim_group_scores(
    anchor_encoded: torch.Tensor, candidate_encoded: torch.Tensor, groups: torch.Tensor, distractors: torch.Tensor
) -> torch.Tensor:
    """Score groups with ContraSim: the mean cosine between row-matched encodings of the two groups.

    Args:
        anchor_encoded: ``(N, d)`` unit-norm encodings of the anchor side.
        candidate_encoded: ``(N, d)`` unit-norm encodings of the candidate side.
        groups: ``(G, g)`` true groups.
        distractors: ``(G, K, g)`` distractor groups.

    Returns:
        ``(G, 1 + K)`` float64 scores, the true group in column 0.
    """
    candidates = _with_true_groups(groups, distractors)
    anchors = anchor_encoded.double()[groups][:, None]  # (G, 1, g, d)
    return (anchors * candidate_encoded.double()[candidates]).sum(dim=-1).mean(dim=-1)


def _centred_grams(x: torch.Tensor) -> torch.Tensor:
    """Return the linear Grams of ``(..., n, D)`` inputs after centring each group's columns."""
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred @ centred.transpose(-1, -2)


def _hsic(gram_a: torch.Tensor, gram_b: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """HSIC of centred Grams ``(..., n, n)``, without the factor that cancels in CKA for the biased estimator."""
    if not unbiased:
        return (gram_a * gram_b).sum(dim=(-1, -2))
    n = gram_a.shape[-1]
    a = gram_a - torch.diag_embed(gram_a.diagonal(dim1=-2, dim2=-1))
    b = gram_b - torch.diag_embed(gram_b.diagonal(dim1=-2, dim2=-1))
    trace_term = (a * b).sum(dim=(-1, -2))
    sums_term = a.sum(dim=(-1, -2)) * b.sum(dim=(-1, -2)) / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (a.sum(dim=-1) * b.sum(dim=-1)).sum(dim=-1)
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def cka_group_scores(
    anchor: torch.Tensor, candidate: torch.Tensor, groups: torch.Tensor, distractors: torch.Tensor, unbiased: bool
) -> torch.Tensor:
    """Score groups with linear CKA, batched over groups; equal to ``contrasim_monitor.measures.linear_cka``.

    The library function takes one pair at a time, which would mean G (1 + K) calls per layer, so this computes the
    same quantity (biased HSIC of Gretton et al. 2005, or the unbiased one of Song et al. 2012) from batched Grams
    in float64. A constant group or a non-positive unbiased self-HSIC gives NaN.

    Args:
        anchor: ``(N, D_a)`` anchor representations.
        candidate: ``(N, D_c)`` candidate representations.
        groups: ``(G, g)`` true groups; the unbiased estimator needs ``g >= 4``.
        distractors: ``(G, K, g)`` distractor groups.
        unbiased: Which HSIC estimator to use.

    Returns:
        ``(G, 1 + K)`` float64 scores, the true group in column 0.
    """
    if unbiased and groups.shape[1] < 4:
        raise ValueError(f"unbiased CKA needs groups of at least 4 examples, got {groups.shape[1]}")
    candidates = _with_true_groups(groups, distractors)
    anchor_grams = _centred_grams(anchor.double()[groups])[:, None]  # (G, 1, g, g)
    candidate_grams = _centred_grams(candidate.double()[candidates])  # (G, 1 + K, g, g)
    cross = _hsic(anchor_grams, candidate_grams, unbiased)
    self_anchor = _hsic(anchor_grams, anchor_grams, unbiased)
    self_candidate = _hsic(candidate_grams, candidate_grams, unbiased)
    denominator = torch.sqrt(self_anchor * self_candidate)
    return torch.where(denominator > 0, cross / denominator, torch.nan)


def correct_groups(scores: torch.Tensor) -> torch.Tensor:
    """Return ``(G,)`` booleans: column 0 strictly above every other column of ``(G, 1 + K)`` scores, and no NaN."""
    valid = ~torch.isnan(scores).any(dim=1)
    return valid & (scores[:, 0] > scores[:, 1:].max(dim=1).values)


def ranking_accuracy(scores: torch.Tensor) -> float:
    """Return the fraction of groups that ``correct_groups`` counts as right."""
    return float(correct_groups(scores).double().mean())
