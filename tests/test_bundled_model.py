"""The bundled model, on the held-out examples: it loads, and its latents carry information."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inpaint_cli.masks import center_mask
from model.hvae import HVAE, default_model_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def _examples(size: int) -> torch.Tensor:
    """Every example image (test concepts, never trained on), resized to the model's size."""
    images = []
    for path in sorted(EXAMPLES.glob("*.png")):
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        images.append(np.asarray(rgb))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def bundled() -> HVAE:
    if not (default_model_path() / "model.safetensors").is_file():
        pytest.skip("no bundled model in this install")
    return HVAE.from_pretrained(default_model_path())


def test_bundled_model_decodes_posterior_latents_better_than_prior_samples(bundled) -> None:
    """Latents drawn from the posterior (which saw the hole) must explain the hole clearly
    better than latents drawn from the prior: a model whose decoder ignored its latents would
    score the same both ways."""
    size = bundled.config.resolution
    images = _examples(size)
    assert len(images) >= 8
    mask = torch.from_numpy(center_mask(size, size)).float().expand(len(images), 1, -1, -1)
    torch.manual_seed(0)
    posterior = bundled.hole_recon_bits_per_dim(images, mask, latents="posterior")
    prior = torch.stack(
        [
            bundled.hole_recon_bits_per_dim(
                images, mask, latents="prior", generator=torch.Generator().manual_seed(seed)
            )
            for seed in range(4)
        ]
    ).mean(0)
    gap = float((prior - posterior).mean())
    print(f"hole recon bits/dim: posterior {posterior.mean():.3f}, prior {prior.mean():.3f}")
    assert gap > 0.1, gap
