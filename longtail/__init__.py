"""longtail: a PyTorch toolkit for long-tailed visual recognition."""

__version__ = "0.1.0"
