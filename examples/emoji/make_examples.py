"""Write the quick-start examples: a dozen TEST-split images of several sizes, masks, captions.

Every image shows a concept that `inpaint shards --split-by concept` puts in the test split of
the bundled model's data (checked here with the same hash), so the model never saw it in
training. Run after build_dataset.py; writes examples/images, examples/masks and
examples/captions.jsonl (the repository's, by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import build_dataset as recipe
import numpy as np
from PIL import Image

from inpaint_cli.images import atomic_write_bytes, load_image, save_png_atomic
from inpaint_cli.masks import make_mask, mask_to_image, stable_seed
from inpaint_cli.shards import assign_split, parse_splits

SPLITS = "train=0.9,val=0.05,test=0.05"
REPO = Path(__file__).resolve().parents[2]

# (stem, file in the built folder, mask kind): 64x64 samples copied as they are.
COPIES = [
    ("thumbs_up_noto", "noto/noto_1f44d-1f3fd_w.png", "center"),
    ("unicorn_3d", "fluent-3d/fluent-3d_1f984_c1.png", "center"),
    ("butterfly_flat", "fluent-flat/fluent-flat_1f98b_w.png", "stroke"),
    ("lion_color", "fluent-color/fluent-color_1f981_c2.png", "center"),
    ("jack_o_lantern_outline", "fluent-high-contrast/fluent-high-contrast_1f383_w.png", "box"),
]
# (stem, style, codepoints, canvas (w, h), emoji size, top-left, background name, mask kind):
# bigger composites, made here from the package files at their own resolution.
COMPOSITES = [
    ("cupcake_3d_128", "fluent-3d", "1f9c1", (128, 128), 104, (12, 12), "pink", "center"),
    ("mushroom_color_200x150", "fluent-color", "1f344", (200, 150), 120, (60, 18), "light blue",
     "stroke"),
    ("crown_noto_96", "noto", "1f451", (96, 96), 80, (8, 8), "purple", "center"),
    ("kite_flat_150x200", "fluent-flat", "1fa81", (150, 200), 110, (20, 50), "beige", "box"),
]  # fmt: skip
# (stem, photo slug, short side, crop (w, h), position, mask kind)
PHOTO_CROPS = [
    ("boats_photo_160x120", "eveningglow", 288, (160, 120), (0.25, 0.7), "stroke"),
]


def test_split(concept: str) -> bool:
    return assign_split(concept, parse_splits(SPLITS)) == "test"


def emoji_sprite(npm: Path, style: str, key: str, size: int) -> Image.Image:
    if style == "noto":
        path = npm / recipe.NPM_GOOGLE / "img/google/64" / f"{key}.png"
    elif style == "fluent-3d":
        path = npm / recipe.NPM_FLUENT_3D / "assets" / f"{key}.webp"
    else:
        raise ValueError(f"{style}: use emoji_svg")
    return load_image(path).convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("data/emoji_src"))
    parser.add_argument("--npm", type=Path, default=Path("data/npm/node_modules"))
    parser.add_argument("--deb", type=Path, default=Path("data/deb"))
    parser.add_argument("--out", type=Path, default=REPO / "examples")
    args = parser.parse_args(argv)

    rows = {
        row["file_name"]: row
        for row in map(json.loads, (args.src / "metadata.jsonl").read_text().splitlines())
    }
    index = recipe.load_emoji_index(args.npm / recipe.NPM_GOOGLE / "emoji.json")
    colours = dict(recipe.BACKGROUNDS)
    examples: list[tuple[str, Image.Image, str, str]] = []  # stem, image, caption, mask kind

    for stem, file_name, kind in COPIES:
        row = rows[file_name]
        assert test_split(row["concept"]), f"{file_name} is not in the test split"
        examples.append((stem, load_image(args.src / file_name).convert("RGB"), row["text"], kind))

    for stem, style, key, canvas_size, size, offset, colour, kind in COMPOSITES:
        info = index[key]
        assert test_split(info.concept), f"{key} is not in the test split"
        if style.startswith("fluent-") and style != "fluent-3d":
            folder = {v: k for k, v in recipe.FLUENT_SVG_STYLES.items()}[style]
            name = recipe.kebab(info.name)
            sprite = recipe.render_svg(
                str(args.npm / recipe.NPM_FLUENT_SVG / "icons" / folder / f"{name}.svg"), size
            )
        else:
            sprite = emoji_sprite(args.npm, style, key, size)
        canvas = Image.new("RGBA", canvas_size, (*colours[colour], 255))
        canvas.alpha_composite(sprite, offset)
        phrase = recipe.STYLE_PHRASES[style][0]
        caption = (
            f"{phrase} {recipe.with_article(info.name)} on {recipe.with_article(colour)} background"
        )
        examples.append((stem, canvas.convert("RGB"), caption, kind))

    photos = {recipe.photo_slug(rel): (pkg, rel, d) for pkg, rel, d in recipe.PHOTOS}
    for stem, slug, short_side, (width, height), (fx, fy), kind in PHOTO_CROPS:
        package, relative, description = photos[slug]
        assert test_split(f"photo:{package}/{slug}"), f"{slug} is not in the test split"
        img = recipe.load_photo(str(args.deb / package / relative))
        scale = short_side / min(img.size)
        img = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS
        )
        left, top = round(fx * (img.width - width)), round(fy * (img.height - height))
        crop = img.crop((left, top, left + width, top + height))
        examples.append((stem, crop, f"a photograph of {description}", kind))

    fashion = [
        (name, row)
        for name, row in sorted(rows.items())
        if row["style"] == "greyscale-photo" and test_split(row["concept"])
    ]
    name, row = fashion[len(fashion) // 2]
    fashion_image = load_image(args.src / name).convert("RGB")
    examples.append(("fashion_photo", fashion_image, row["text"], "center"))

    photo_rows = [
        (name, row)
        for name, row in sorted(rows.items())
        if row["style"] == "photo" and test_split(row["concept"]) and "grey" in row["concept"]
    ]
    name, row = photo_rows[0]
    examples.append(("architecture_photo", load_image(args.src / name), row["text"], "box"))

    for folder in ("images", "masks"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    captions = []
    for stem, image, caption, kind in examples:
        save_png_atomic(image, args.out / "images" / f"{stem}.png")
        rng = np.random.default_rng(stable_seed("examples", stem))
        mask = make_mask(kind, image.height, image.width, rng, hole_area=(0.15, 0.35))
        save_png_atomic(mask_to_image(mask), args.out / "masks" / f"{stem}.png")
        captions.append(json.dumps({"file_name": f"{stem}.png", "text": caption}))
        print(f"{stem}.png {image.width}x{image.height} {kind}: {caption}")
    atomic_write_bytes(args.out / "captions.jsonl", ("\n".join(captions) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
