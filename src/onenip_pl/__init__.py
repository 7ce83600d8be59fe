"""OneNIP multi-class anomaly detection with one normal image prompt, on Lightning and Hydra."""

__version__ = "0.1.0"
