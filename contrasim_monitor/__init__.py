"""contrasim-monitor: watch a model's internal representations form while it trains.

The core needs torch, numpy, safetensors, tensorboard and matplotlib, never transformers or accelerate. The
Trainer and Accelerate adapters live in ``contrasim_monitor.integrations`` and import their frameworks when they
are imported.
"""

from .capture import LayerSpec, capture_activations, resolve_layers
from .contrasim import ContraSim, ContraSimConfig, contrasim_pairs
from .monitor import Monitor
from .probe import ProbeSet
from .result import CaptureResult
from .schedule import EveryNSteps, LogSpaced
from .tracker import SimilarityTracker

__version__ = "0.1.0"

__all__ = [
    "CaptureResult",
    "ContraSim",
    "ContraSimConfig",
    "EveryNSteps",
    "LayerSpec",
    "LogSpaced",
    "Monitor",
    "ProbeSet",
    "SimilarityTracker",
    "capture_activations",
    "contrasim_pairs",
    "resolve_layers",
]
