"""dynadiff: decode images from fMRI time series (Dynadiff, Meta FAIR 2025)."""

__version__ = "0.1.0"

from dynadiff.decoder import Decoder  # noqa: E402  (cheap: torch is imported when a decoder is built)

__all__ = ["Decoder", "__version__"]
