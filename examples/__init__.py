"""Runnable training jobs with the monitor attached, installed as ``contrasim_monitor.examples``."""
