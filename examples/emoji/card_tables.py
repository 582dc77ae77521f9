"""The model card's derived tables from `inpaint eval` reports (their metrics.json).

    python examples/emoji/card_tables.py NEW_REPORT [OLD_REPORT]

For NEW_REPORT: the mean of the samples minus the biharmonic fill in hole PSNR, by source (a
key's prefix before its first "_", e.g. "noto", "photo"), again without the images where
biharmonic is exact (capped), and the caption ablation's empty minus true by source. With
OLD_REPORT (another model on the same images and holes): new minus old, paired, for the T=0
fill, the mean of the samples, the hole NLL bounds and the diversity. Every difference is the
mean with its paired bootstrap 95% interval, as in `inpaint eval`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from inpaint_cli.metrics import paired_bootstrap_interval


def _interval(a: np.ndarray, b: np.ndarray, digits: int) -> str:
    result = paired_bootstrap_interval(a, b)
    return f"{result.mean:+.{digits}f} [{result.low:+.{digits}f}, {result.high:+.{digits}f}]"


def _by_source(keys: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key.split("_")[0]].append(index)
    return dict(sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))


def _mean_of_samples(methods: dict) -> str:
    names = [name for name in methods if name.startswith("model, mean of ")]
    if not names:
        raise SystemExit("error: the report has no 'model, mean of N' (run eval with --samples 2+)")
    return names[0]


def source_tables(report: dict) -> list[str]:
    """Markdown lines: model minus biharmonic by source, and empty minus true captions."""
    per_image = report["per_image"]
    methods = per_image["methods"]
    if "biharmonic" not in methods:
        raise SystemExit("error: the report has no biharmonic baseline (run eval with --baselines)")
    name = _mean_of_samples(methods)
    model = np.asarray(methods[name]["psnr"], dtype=float)
    biharmonic = np.asarray(methods["biharmonic"]["psnr"], dtype=float)
    lines = [f"| source | images | {name} minus biharmonic, hole PSNR (dB) |"]
    lines.append("| --- | ---: | --- |")
    for source, rows in _by_source(per_image["keys"]).items():
        lines.append(f"| {source} | {len(rows)} | {_interval(model[rows], biharmonic[rows], 2)} |")
    exact = biharmonic >= report["psnr_cap_db"]
    if exact.any() and not exact.all():
        kept = ~exact
        count = int(exact.sum())
        lines.append(
            f"\nwithout the {count} image{'s' if count > 1 else ''} biharmonic fills exactly: "
            f"{_interval(model[kept], biharmonic[kept], 2)} dB"
        )
    ablation = report.get("caption_ablation")
    if ablation:
        rows_of = ablation["per_image"]
        true = np.asarray(rows_of["true"], dtype=float)
        empty = np.asarray(rows_of["empty"], dtype=float)
        lines += ["", "| source | images | empty minus true captions (bits/dim) |"]
        lines.append("| --- | ---: | --- |")
        for source, rows in _by_source(rows_of["keys"]).items():
            lines.append(f"| {source} | {len(rows)} | {_interval(empty[rows], true[rows], 3)} |")
    return lines


def paired_against(new: dict, old: dict) -> list[str]:
    """Lines of new minus old on the same images: PSNR and SSIM of the fills, NLL, diversity."""
    new_images, old_images = new["per_image"], old["per_image"]
    if new_images["keys"] != old_images["keys"] or new["masks"] != old["masks"]:
        raise SystemExit("error: the two reports do not cover the same images with the same holes")
    lines = []
    for name in ("model, fill at T=0", _mean_of_samples(new_images["methods"])):
        if name not in old_images["methods"]:
            continue
        for metric, digits in (("psnr", 2), ("ssim", 3)):
            a = np.asarray(new_images["methods"][name][metric], dtype=float)
            b = np.asarray(old_images["methods"][name][metric], dtype=float)
            lines.append(f"{name}, {metric}: {_interval(a, b, digits)}")
    for field in ("iwae_bits_per_dim", "negative_elbo_bits_per_dim", "diversity"):
        a = np.asarray(new_images[field], dtype=float)
        b = np.asarray(old_images[field], dtype=float)
        finite = np.isfinite(a) & np.isfinite(b)
        if finite.any():
            lines.append(f"{field}: {_interval(a[finite], b[finite], 4)}")
    return lines


def _load(folder: Path) -> dict:
    path = folder / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {path}: cannot read the report ({error})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("new", type=Path, help="inpaint eval output folder")
    parser.add_argument("old", type=Path, nargs="?", help="another model's report, same images")
    args = parser.parse_args()
    new = _load(args.new)
    print("\n".join(source_tables(new)))
    if args.old:
        print(f"\n{args.new} minus {args.old}, paired:")
        print("\n".join(paired_against(new, _load(args.old))))


if __name__ == "__main__":
    main()
