"""inpaint: fill holes in images with a hierarchical VAE."""

__version__ = "0.1.0"
