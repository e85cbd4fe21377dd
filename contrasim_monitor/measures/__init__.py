"""Closed-form similarity measures between two (examples, features) representations.

Every measure accepts torch tensors or numpy arrays of any real dtype on any device, computes in float64 and returns
float64 tensors. Inputs with NaN or inf raise `NonFiniteError`. A constant input gives NaN with a
`ConstantInputWarning`.
"""

from ._common import ConstantInputWarning, NonFiniteError
from .cca import pwcca, svcca
from .cka import MinibatchCKA, linear_cka, linear_cka_matrix
from .knn import mutual_knn
from .procrustes import ProcrustesResult, procrustes

__all__ = [
    "ConstantInputWarning",
    "MinibatchCKA",
    "NonFiniteError",
    "ProcrustesResult",
    "linear_cka",
    "linear_cka_matrix",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "svcca",
]
