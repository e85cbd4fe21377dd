"""Framework adapters. Import the submodule for your framework; each imports its framework when imported:

- ``contrasim_monitor.integrations.transformers``: ``ContraSimCallback`` for the Hugging Face Trainer.
- ``contrasim_monitor.integrations.accelerate``: ``SimilarityMonitor`` for Accelerate custom loops.
"""
