"""dynadiff: decode images from fMRI time series (Dynadiff, Meta FAIR 2025)."""

__version__ = "0.1.0"
