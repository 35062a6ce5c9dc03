"""Zero-shot video semantic segmentation from pre-trained diffusion models."""

__version__ = "0.1.0"
