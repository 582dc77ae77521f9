"""Training throughput: images/s and achieved GFLOP/s per preset, against the measured matmul
peak (model FLOP utilisation), from in-memory batches and from real shards.

FLOPs of one training step (forward + backward) are counted with
torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls; element-wise work is not
counted, so the utilisation is a lower bound on how busy the cores are). Variants:
- fp32: as `inpaint train` runs by default,
- channels_last: the model and batch in channels-last memory format (the loss must not change),
- bf16: `torch.autocast("cpu", torch.bfloat16)`, as `--mixed-precision bf16`; also prints the
  change of the negative ELBO (bits/dim) against fp32 on the same batch and noise. Skipped
  unless asked for when this CPU's bf16 matmul is slower than its fp32 matmul.
- compile: `torch.compile(model)` (inductor), only with `--variants ...,compile`: compiling
  takes minutes on a small CPU; the compile time is printed apart and not in images/s.

Run: python benchmarks/bench_train.py [--presets tiny,small,base]
     [--batch-size 16] [--steps 3] [--variants fp32,channels_last,bf16] [--data SHARDS]
     [--num-workers 2] [--threads N]
Without --data, 256 synthetic 64x64 images are packed into temporary shards.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, matmul_peak_gflops, synthetic_images, write_folder


def batch_for(resolution: int, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    from inpaint_cli.masks import make_mask

    rng = np.random.default_rng(seed)
    images = np.stack(synthetic_images(batch_size, resolution, seed=seed))
    kinds = ("center", "box", "stroke")
    masks = np.stack(
        [make_mask(kinds[i % 3], resolution, resolution, rng) for i in range(batch_size)]
    )
    image = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return image.contiguous(), torch.from_numpy(masks).float()[:, None].contiguous()


def step_flops(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(image, mask)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def precision_context(variant: str):
    if variant == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, variant: str):
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
        mask = mask.contiguous(memory_format=torch.channels_last)
    if variant == "compile":
        model = torch.compile(model)
    return model, image, mask


def train_steps(
    model: torch.nn.Module,
    batches,
    steps: int,
    variant: str,
) -> float:
    """Seconds for `steps` optimizer steps (after one warm-up step), data fetch included."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    elapsed = 0.0
    for index in range(steps + 1):
        start = time.perf_counter()
        image, mask = next(batches)
        with precision_context(variant):
            loss = model(image, mask)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index > 0:  # the first step pays for allocation and kernel selection
            elapsed += time.perf_counter() - start
        elif variant == "compile":
            print(f"  compile: first step {time.perf_counter() - start:.1f} s", flush=True)
    return elapsed


def same_noise_nll(model: torch.nn.Module, image, mask, variant: str) -> float:
    """Negative ELBO with the same posterior noise whatever the variant: randn_like would draw
    in memory order (channels-last) or in bf16, so it is replaced by a float32 draw in logical
    order, cast afterwards."""
    from unittest import mock

    def randn_like(tensor: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.randn(tuple(tensor.shape), device=tensor.device).to(tensor.dtype)

    torch.manual_seed(1234)
    with torch.no_grad(), precision_context(variant), mock.patch("torch.randn_like", randn_like):
        return float(model(image, mask)["nll_bits_per_dim"])


def repeat(image: torch.Tensor, mask: torch.Tensor):
    while True:
        yield image, mask


def make_shards(scratch: Path, count: int = 256) -> str:
    from inpaint_cli.shards import write_shards

    folder = write_folder(scratch / "images", synthetic_images(count, 64, seed=7))
    summary = write_shards(folder, scratch / "shards", max_count=64)
    return summary["splits"]["train"]["pattern"]


def loader_batches(pattern: str, resolution: int, batch_size: int, workers: int):
    from inpaint_cli.data import train_loader

    for batch in train_loader(pattern, resolution, batch_size, seed=0, num_workers=workers):
        yield batch["image"], batch["mask"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small,base")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=None, help="default: fp32,channels_last(,bf16)")
    parser.add_argument("--data", default=None, help="shard pattern for the data-pipeline run")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from model.hvae import HVAE, preset_config

    print(machine_line())
    peak = {"fp32": matmul_peak_gflops("fp32")}
    print(f"matmul peak 2048x2048: fp32 {peak['fp32']:.1f} GFLOP/s", flush=True)
    peak["bf16"] = matmul_peak_gflops("bf16", budget_seconds=0.0)
    print(f"matmul peak 2048x2048: bf16 {peak['bf16']:.1f} GFLOP/s", flush=True)
    if args.variants:
        variants = args.variants.split(",")
    else:
        variants = ["fp32", "channels_last"]
        if peak["bf16"] >= peak["fp32"]:
            variants.append("bf16")
        else:
            print("bf16 left out: this CPU's bf16 matmul is slower than fp32 (--variants to force)")

    for preset in args.presets.split(","):
        torch.manual_seed(0)
        reference = HVAE(preset_config(preset))
        resolution = reference.config.resolution
        image, mask = batch_for(resolution, args.batch_size)
        flops = step_flops(reference, image, mask)
        params = sum(p.numel() for p in reference.parameters()) / 1e6
        print(
            f"\n{preset}: {params:.2f} M parameters, {resolution}x{resolution}, batch "
            f"{args.batch_size}: {flops / args.batch_size / 1e9:.3f} GFLOP per image per step",
            flush=True,
        )
        fp32_nll = same_noise_nll(reference, image, mask, "fp32")
        for variant in variants:
            torch.manual_seed(0)
            model, var_image, var_mask = prepare(HVAE(preset_config(preset)), image, mask, variant)
            nll = same_noise_nll(model, var_image, var_mask, variant)
            seconds = train_steps(model, repeat(var_image, var_mask), args.steps, variant)
            images_per_second = args.batch_size * args.steps / seconds
            achieved = flops * args.steps / seconds / 1e9
            peak_name = "bf16" if variant == "bf16" else "fp32"
            print(
                f"  {variant:13s} {images_per_second:8.2f} images/s  {achieved:7.2f} GFLOP/s  "
                f"MFU {100 * achieved / peak[peak_name]:5.1f}% of {peak_name} peak  "
                f"NLL change {nll - fp32_nll:+.2e} bits/dim",
                flush=True,
            )

    # In-memory and shard-fed training alternate (A B A B) so that a change in the machine's
    # load between the two does not pass for a data-pipeline cost.
    preset = "small" if "small" in args.presets.split(",") else args.presets.split(",")[0]
    scratch = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        pattern = args.data or make_shards(scratch)
        torch.manual_seed(0)
        model = HVAE(preset_config(preset))
        resolution = model.config.resolution
        image, mask = batch_for(resolution, args.batch_size)
        batches = loader_batches(pattern, resolution, args.batch_size, args.num_workers)
        next(batches)  # start the workers
        count = max(8, 2 * args.steps)
        start = time.perf_counter()
        for _ in range(count):
            next(batches)
        loader_rate = args.batch_size * count / (time.perf_counter() - start)
        source = "given shards" if args.data else "synthetic shards"
        print(
            f"\ndata pipeline ({source}, {args.num_workers} workers): the loader alone delivers "
            f"{loader_rate:.1f} images/s at {resolution}x{resolution}"
        )
        for round_index in range(2):
            for label, feed in (("in-memory", repeat(image, mask)), ("from shards", batches)):
                seconds = train_steps(model, feed, args.steps, "fp32")
                print(
                    f"  round {round_index + 1}: {preset} fp32 training {label:11s} "
                    f"{args.batch_size * args.steps / seconds:7.2f} images/s",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
