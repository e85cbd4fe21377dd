"""contrasim-monitor: watch a model's internal representations form while it trains."""

__version__ = "0.1.0"
