"""Caption embedding throughput of the default text encoder (captions/s at batch 64).

Run: python benchmarks/text_encoder.py [--batches 8] [--threads N]
Every caption is unique, so each one runs the model (cache misses); cache-hit speed is printed too.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from conditioning import TextEncoder

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey"]
THINGS = ["apple", "star", "heart", "cat", "car", "flower", "smiling face", "house", "fish", "moon"]
EXTRA_WORDS = "drawn with thick outlines and soft shading in a flat cartoon style".split()
PLACES = ["on a white background", "in a field", "next to a tree", "on a wooden table", "at night"]


def captions(count: int) -> list[str]:
    """All different, of mixed length like real captions (about 9 to 20 tokens)."""
    combos = itertools.islice(itertools.cycle(itertools.product(COLOURS, THINGS, PLACES)), count)
    return [
        " ".join([f"a {colour} {thing} {place}", *EXTRA_WORDS[: index % 12], f"(picture {index})"])
        for index, (colour, thing, place) in enumerate(combos)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    encoder = TextEncoder(batch_size=args.batch_size, cache_size=0)
    load_s = time.perf_counter() - start
    encoder.encode(captions(args.batch_size))  # warm-up: first-call allocations

    texts = captions(args.batch_size * (args.batches + 1))[args.batch_size :]
    start = time.perf_counter()
    encoder.encode(texts)  # runs the model in batches of batch_size
    miss_s = time.perf_counter() - start

    encoder.cache_size = len(texts)
    encoder.encode(texts)
    start = time.perf_counter()
    encoder.encode(texts)
    hit_s = time.perf_counter() - start

    start = time.perf_counter()
    encoder.identity()
    hash_s = time.perf_counter() - start
    print(f"torch threads: {torch.get_num_threads()}, load: {load_s:.1f} s (incl. imports)")
    print(f"encode, batch {args.batch_size}, unique captions: {len(texts) / miss_s:.0f} captions/s")
    print(f"encode, all cached: {len(texts) / hit_s:.0f} captions/s")
    print(f"weights hash (first call): {hash_s:.2f} s")


if __name__ == "__main__":
    main()
