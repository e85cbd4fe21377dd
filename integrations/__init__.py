"""Framework adapters. Import the submodule for your framework; each imports its framework lazily:

- ``contrasim_monitor.integrations.transformers``: ``ContraSimCallback`` for the Hugging Face Trainer.
"""
