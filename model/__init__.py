"""The hierarchical VAE for inpainting (see hvae.py)."""

from model.hvae import HVAE, PRESETS, HVAEConfig, default_model_path, preset_config

__all__ = ["HVAE", "HVAEConfig", "PRESETS", "default_model_path", "preset_config"]
