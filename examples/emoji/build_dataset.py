"""Build the captioned 64x64 training folder for the bundled model (an HF imagefolder).

Sources (all installed offline by build.sh, see README.md beside this file):
  npm emoji-datasource-google (Noto emoji PNGs, names in emoji.json), npm @lobehub/fluent-emoji-3d
  (WebP by codepoint), npm fluentui-emoji (SVG by CLDR name, rendered with resvg-py), Debian
  dataset-fashion-mnist (grey product photos) and photographs from Debian wallpaper packages.

Output: <out>/<style>/<stem>.png (64x64 RGB) and <out>/metadata.jsonl with the columns
file_name, text, concept, source, licence, style. `concept` is the grouping column for
`inpaint shards --split-by concept`: every style, skin tone, gender variant and background of one
emoji shares it, and all crops of one photograph share it.

Everything is decided up front from the seed and each sample's key (never from processing order),
so a rerun, an interrupted run resumed, or a run with more workers writes identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from inpaint_cli.images import atomic_write_bytes, decode_image, load_image, png_bytes

SIZE = 64
NPM_GOOGLE = "emoji-datasource-google"
NPM_FLUENT_3D = "@lobehub/fluent-emoji-3d"
NPM_FLUENT_SVG = "fluentui-emoji"
# Reserved by the product team for independent evaluation: refuse them even if someone points
# the script at a folder that holds them.
RESERVED_NAMES = ("emoji-datasource-twitter", "tuxpaint", "openmoji")

SKIN_TONES = {
    "1f3fb": "light",
    "1f3fc": "medium-light",
    "1f3fd": "medium",
    "1f3fe": "medium-dark",
    "1f3ff": "dark",
}
FLUENT_SKIN_SUFFIXES = {
    "default": None,
    "light": "1f3fb",
    "medium-light": "1f3fc",
    "medium": "1f3fd",
    "medium-dark": "1f3fe",
    "dark": "1f3ff",
}
# fluentui-emoji file names that are not CLDR names (checked against fluentui-emoji@1.3.0).
FLUENT_NAME_FIXES = {
    "blackbird": "black-bird",
    "phoenix-bird": "phoenix",
    "keycap-asterisk": "keycap-*",
    "keycap-hashtag": "keycap-#",
    "red-triangle": "red-triangle-pointed-up",
    "stuffedbread": "stuffed-flatbread",
    "stuffedbread-flat": "stuffed-flatbread",
    "person-blonde-hair": "person-blond-hair",
    "man-blonde-hair": "man-blond-hair",
    "woman-blonde-hair": "woman-blond-hair",
    "person-deaf": "deaf-person",
    "man-deaf": "deaf-man",
    "woman-deaf": "deaf-woman",
    "person-elf": "elf",
    "person-fairy": "fairy",
    "person-genie": "genie",
    "person-mage": "mage",
    "person-merpeople": "merperson",
    "man-merpeople": "merman",
    "woman-merpeople": "mermaid",
    "person-superhero": "superhero",
    "person-supervillain": "supervillain",
    "person-vampire": "vampire",
    "person-zombie": "zombie",
    "person-with-bunny-ears": "people-with-bunny-ears",
    "man-with-bunny-ears": "men-with-bunny-ears",
    "woman-with-bunny-ears": "women-with-bunny-ears",
    "person-wrestling": "people-wrestling",
    "man-wrestling": "men-wrestling",
    "woman-wrestling": "women-wrestling",
}
FLUENT_SVG_STYLES = {
    "modern": "fluent-color",
    "flat": "fluent-flat",
    "high-contrast": "fluent-high-contrast",
}
STYLE_PHRASES = {
    "noto": ["a Noto emoji of", "a cartoon emoji of", "a Google-style emoji of", "an icon of"],
    "fluent-3d": [
        "3D render of",
        "a 3D emoji of",
        "a glossy 3D icon of",
        "a clay-like 3D model of",
    ],
    "fluent-color": ["a gradient emoji of", "a colourful vector emoji of", "an icon of"],
    "fluent-flat": ["a flat icon of", "a flat vector emoji of", "a flat-colour drawing of"],
    "fluent-high-contrast": [
        "a black and white icon of",
        "a monochrome line icon of",
        "a black outline drawing of",
    ],
}
EMOJI_TEMPLATES = [
    "{n}",
    "{an}",
    "an emoji of {an}",
    "{an} emoji",
    "{an}, {category}",
    "{style} {an}",
    "{style} {an}, {category}",
    "{short}",
    "{uname}",
    "{an} ({subcategory})",
]
# Background colours with names so captions can mention them; jittered per sample.
BACKGROUNDS = [
    ("red", (220, 40, 40)),
    ("orange", (245, 140, 30)),
    ("yellow", (250, 220, 60)),
    ("lime green", (160, 220, 60)),
    ("green", (40, 160, 70)),
    ("teal", (30, 150, 150)),
    ("light blue", (140, 200, 240)),
    ("blue", (40, 90, 210)),
    ("navy", (20, 30, 90)),
    ("purple", (130, 60, 180)),
    ("pink", (245, 150, 190)),
    ("brown", (120, 80, 40)),
    ("beige", (230, 215, 180)),
    ("grey", (128, 128, 128)),
    ("light grey", (210, 210, 210)),
    ("black", (15, 15, 15)),
]
FASHION_CLASSES = [
    ["a t-shirt", "a top", "a short-sleeved top"],
    ["a pair of trousers", "trousers", "a pair of pants"],
    ["a pullover", "a jumper", "a sweater"],
    ["a dress"],
    ["a coat", "a jacket"],
    ["a sandal"],
    ["a shirt"],
    ["a sneaker", "a trainer", "a sports shoe"],
    ["a bag", "a handbag"],
    ["an ankle boot", "a boot"],
]
FASHION_CLASS_IDS = [
    "t-shirt-top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
FASHION_TEMPLATES = [
    "{an}",
    "a greyscale photo of {an}",
    "a black and white product photo of {an}",
    "{an} on a black background",
    "a small grey photograph of {an}, clothing",
    "fashion product photo: {n}",
]
# Photographs only (the illustrated and rendered wallpapers are left out); descriptions were
# written by looking at each picture. Paths are inside the extracted Debian packages.
PHOTOS = [
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/BytheWater/contents/images/2560x1600.jpg",
     "the wooden planks of a jetty by a lake at sunset"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/ColdRipple/contents/images/2560x1600.jpg",
     "a wooden jetty in grey fog on a still lake"),
    ("plasma-workspace-wallpapers",
     "usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg",
     "stacked colourful plastic cups seen from above"),
    ("plasma-workspace-wallpapers",
     "usr/share/wallpapers/DarkestHour/contents/images/2560x1600.jpg",
     "a misty blue lake at dusk"),
    ("plasma-workspace-wallpapers",
     "usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg",
     "wooden rowing boats on a lake shore at sunset"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/FallenLeaf/contents/images/2560x1600.jpg",
     "a fallen autumn maple leaf on the ground"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/Grey/contents/images/2560x1600.jpg",
     "curved white architectural panels in black and white"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/Kite/contents/images/2560x1600.jpg",
     "a colourful kite in a blue sky with white clouds"),
    ("plasma-workspace-wallpapers",
     "usr/share/wallpapers/OneStandsOut/contents/images/2560x1600.jpg",
     "green star-shaped moss with one orange sprig"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/Path/contents/images/2560x1600.jpg",
     "a footpath through a dark green pine forest"),
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/summer_1am/contents/images/2560x1600.jpg",
     "a calm lake under a pink and violet sky at dawn"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Aqua.jpg",
     "a splashing water droplet"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Blinds.jpg",
     "the veins of a bright green leaf close up"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Dune.jpg",
     "dune grass in front of the sea"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/FreshFlower.jpg",
     "an orange flower close up"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Garden.jpg",
     "a red and yellow marigold flower"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/GreenMeadow.jpg",
     "fresh green grass shoots"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/LadyBird.jpg",
     "a ladybird on a grass stem among blue forget-me-nots"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/RainDrops.jpg",
     "rain drops on green leaves"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Storm.jpg",
     "dark storm clouds over a road"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/TwoWings.jpg",
     "dandelion seeds in front of orange flowers"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/Wood.jpg",
     "pale weathered wooden boards"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/YellowFlower.jpg",
     "a yellow flower close up"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_0B_by_freespace.jpg",
     "half a fig in a red bowl on concrete"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_1A_by_freespace.jpg",
     "colourful paint brushes in a pot"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg",
     "a drum on a beanbag and a bottle of wine in a room"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg",
     "an autumn forest and a green meadow below grey mountains"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg",
     "two spaniel dogs looking out of a window"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg",
     "a stream flowing over rocks in a forest"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg",
     "a dirt path across a meadow below rocky snowy mountains"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg",
     "dandelion seed heads in a field at sunset"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg",
     "the sun setting over mountains"),
]  # fmt: skip
PHOTO_TEMPLATES = [
    "a photograph of {d}",
    "{d}",
    "a photo crop of {d}",
    "detail of a photograph of {d}",
    "a close-up photo of {d}",
    "part of a photo: {d}",
]
# Short sides the photographs are downscaled to before cropping: from almost the whole picture
# (coarse structure) to fine texture.
PHOTO_SHORT_SIDES = (80, 128, 192, 288, 432)
# Skip reason -> names of the source files skipped for it.
Skipped = defaultdict[str, list[str]]


@dataclass(frozen=True)
class Sample:
    file_name: str
    text: str
    concept: str
    source: str
    licence: str
    style: str
    # How to make the pixels; every random choice is already in here.
    kind: str  # "raster", "svg", "fashion", "photo"
    path: str = ""
    index: int = 0
    size: int = SIZE
    offset: tuple[int, int] = (0, 0)
    background: tuple[int, int, int] = (255, 255, 255)
    # Photo crops: the short side the photo is downscaled to, and the crop's top-left corner as
    # a fraction of the free room (so it does not depend on the decoded size).
    short_side: int = 0
    position: tuple[float, float] = (0.0, 0.0)


def stable_rng(seed: int, key: str) -> random.Random:
    # random.Random seeded from a hash (not hash(), which is salted per process) is reproducible
    # across runs and processes, and much cheaper to create per sample than a numpy Generator.
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def choose(rng: random.Random, options: list):
    return options[rng.randrange(len(options))]


def codepoints(text: str) -> list[str]:
    """'1F385-FE0F' / '39-fe0f-20e3' / '1f3f4-e0067_e0062' -> ['1f385'], ['0039', '20e3'], ..."""
    return [f"{int(part, 16):04x}" for part in re.split(r"[-_]", text) if part]


def norm_key(parts: list[str]) -> str:
    # Variation selectors differ between files of the same emoji (qualified or not).
    return "-".join(p for p in parts if p != "fe0f")


def concept_of(parts: list[str]) -> str:
    """Base emoji shared by all skin tones and gender variants of one emoji."""
    parts = [p for p in parts if p != "fe0f" and p not in SKIN_TONES]
    if "200d" in parts:
        # In ZWJ sequences man/woman/boy/girl are variants of person/child, and the gender
        # signs only pick a variant: "woman surfing" and "man health worker" group with
        # "person surfing" and "health worker".
        swap = {"1f468": "1f9d1", "1f469": "1f9d1", "1f466": "1f9d2", "1f467": "1f9d2"}
        parts = [swap.get(p, p) for p in parts if p not in ("2640", "2642")]
        joined = "-".join(parts)
        while "200d-200d" in joined:
            joined = joined.replace("200d-200d", "200d")
        parts = joined.strip("-").split("-")
        while parts and parts[-1] == "200d":
            parts.pop()
    return "emoji:" + "-".join(parts)


def kebab(text: str) -> str:
    return re.sub(r"[^a-z0-9#*]+", "-", text.lower().replace("\u2019", "").replace("'", "")).strip(
        "-"
    )


def with_article(name: str) -> str:
    lower = name.lower()
    if lower.startswith("flag of"):
        return "the " + name
    # Plural names ("people holding hands", "sparkles") take no article; "with" and ":" start
    # a qualifier, so "grinning face with big eyes" is judged on "grinning face".
    head = lower.split(" with ")[0].split(":")[0]
    if head.startswith(("people", "men ", "women ", "family", "kiss")) or head.endswith("s"):
        return name
    first = name.split()[0]
    # Proper names ("Leo", "Santa Claus") and lone gerunds ("cooking") take none either.
    if (first[:1].isupper() and first[1:].islower()) or (" " not in head and head.endswith("ing")):
        return name
    if lower.startswith(("uni", "one", "eu", "use")):
        return "a " + name
    return ("an " if lower[0] in "aeiou" else "a ") + name


@dataclass
class EmojiInfo:
    concept: str
    name: str  # CLDR name without skin tone
    unicode_name: str
    short_names: list[str]
    category: str
    subcategory: str
    skin: str | None


def load_emoji_index(emoji_json: Path) -> dict[str, EmojiInfo]:
    """Map normalised codepoints ('1f385-1f3fd') to names, for every emoji and skin variant."""
    import emoji as emoji_lib  # CLDR names; build-time only dependency of this recipe

    cldr: dict[str, str] = {}
    for char, data in emoji_lib.EMOJI_DATA.items():
        key = norm_key([f"{ord(c):04x}" for c in char])
        cldr.setdefault(key, data["en"].strip(":").replace("_", " "))

    index: dict[str, EmojiInfo] = {}
    for entry in json.loads(emoji_json.read_text()):
        parts = codepoints(entry["unified"])
        key = norm_key(parts)
        category = entry["category"].replace("&", "and").lower()
        name = cldr.get(key) or entry["name"].lower()
        if entry["category"] == "Flags" and "flag" not in name.lower():
            name = f"flag of {name}"
        base = EmojiInfo(
            concept=concept_of(parts),
            name=name,
            unicode_name=entry["name"].lower(),
            short_names=[s.replace("_", " ").replace("-", " ") for s in entry["short_names"]],
            category=category,
            # 'plant-other' -> 'plant', 'food-prepared' -> 'food prepared'
            subcategory=entry["subcategory"].replace("-other", "").replace("-", " "),
            skin=None,
        )
        index[key] = base
        if entry.get("non_qualified"):
            index.setdefault(norm_key(codepoints(entry["non_qualified"])), base)
        for tones, variation in entry.get("skin_variations", {}).items():
            tone_names = list(dict.fromkeys(SKIN_TONES[t] for t in codepoints(tones)))
            skin = " and ".join(tone_names) + (
                " skin tones" if len(tone_names) > 1 else " skin tone"
            )
            variant = EmojiInfo(**{**asdict(base), "skin": skin})
            index[norm_key(codepoints(variation["unified"]))] = variant
    return index


def emoji_caption(info: EmojiInfo, style: str, rng: random.Random, bg: str | None) -> str:
    name = info.name
    short = choose(rng, info.short_names) if info.short_names else name
    uname = info.unicode_name
    if info.skin:
        skin = f" with {info.skin}"
        name, short, uname = name + skin, short + skin, uname + skin
    text = choose(rng, EMOJI_TEMPLATES).format(
        n=name,
        an=with_article(name),
        category=info.category,
        subcategory=info.subcategory,
        style=choose(rng, STYLE_PHRASES[style]),
        short=short,
        uname=uname,
    )
    if bg is not None and rng.random() < 0.5:
        text += f" on {with_article(bg)} background"
    return text


def emoji_samples(
    style: str,
    key: str,
    info: EmojiInfo,
    kind: str,
    path: Path,
    source: str,
    licence: str,
    seed: int,
    colour_copies: int,
) -> list[Sample]:
    """One copy on white at full size plus `colour_copies` on flat colours, scaled and shifted."""
    samples = []
    for copy in range(colour_copies + 1):
        stem = f"{style}_{key}_{'w' if copy == 0 else f'c{copy}'}"
        rng = stable_rng(seed, stem)
        if copy == 0:
            bg_name, rgb, size, offset = None, (255, 255, 255), SIZE, (0, 0)
        else:
            bg_name, base_rgb = choose(rng, BACKGROUNDS)
            rgb = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in base_rgb)
            size = rng.randint(38, SIZE)
            offset = (rng.randint(0, SIZE - size), rng.randint(0, SIZE - size))
        samples.append(
            Sample(
                file_name=f"{style}/{stem}.png",
                text=emoji_caption(info, style, rng, bg_name),
                concept=info.concept,
                source=source,
                licence=licence,
                style=style,
                kind=kind,
                path=str(path),
                size=size,
                offset=offset,
                background=rgb,
            )
        )
    return samples


def npm_version(package_dir: Path) -> str:
    return json.loads((package_dir / "package.json").read_text())["version"]


def plan_noto(npm: Path, index: dict[str, EmojiInfo], seed: int, copies: int, skipped: Skipped):
    package = npm / NPM_GOOGLE
    source = f"npm:{NPM_GOOGLE}@{npm_version(package)}"
    # The package code is MIT; its Google/Noto images are Apache-2.0 (package README).
    licence = "Apache-2.0"
    entries = json.loads((package / "emoji.json").read_text())
    for entry in entries:
        variants = [(entry["unified"], entry)]
        variants += [(v["unified"], v) for v in entry.get("skin_variations", {}).values()]
        for unified, data in variants:
            path = package / "img" / "google" / "64" / data["image"]
            if not data.get("has_img_google") or not path.exists():
                skipped["noto: no image"].append(data["image"])
                continue
            key = norm_key(codepoints(unified))
            yield from emoji_samples(
                "noto", key, index[key], "raster", path, source, licence, seed, copies
            )


def plan_fluent_3d(
    npm: Path, index: dict[str, EmojiInfo], seed: int, copies: int, skipped: Skipped
):
    package = npm / NPM_FLUENT_3D
    source = f"npm:{NPM_FLUENT_3D}@{npm_version(package)}"
    seen: set[str] = set()
    for path in sorted((package / "assets").glob("*.webp")):
        key = norm_key(codepoints(path.stem))
        if key not in index and key + "-e007f" in index:
            # Subdivision flags (England, Scotland, Wales) are named without their cancel tag.
            key += "-e007f"
        if key not in index:
            skipped["fluent-3d: codepoints not in emoji.json"].append(path.name)
            continue
        if key in seen:
            # Keycaps and (c)/(R) come twice, with and without zero-padded codepoints.
            skipped["fluent-3d: duplicate"].append(path.name)
            continue
        seen.add(key)
        yield from emoji_samples(
            "fluent-3d", key, index[key], "raster", path, source, "MIT", seed, copies
        )


def fluent_name_index(index: dict[str, EmojiInfo]) -> dict[str, str]:
    """kebab-case CLDR name (and aliases) -> normalised codepoints, for emoji in `index`."""
    import emoji as emoji_lib

    by_name: dict[str, str] = {}
    # CLDR names first: some GitHub-style aliases are another emoji's CLDR name (":egg:" is
    # the alias of "cooking", ":whale:" of "spouting whale").
    for field in ("en", "alias"):
        for char, data in emoji_lib.EMOJI_DATA.items():
            key = norm_key([f"{ord(c):04x}" for c in char])
            if key not in index:
                continue
            names = [data["en"]] if field == "en" else data.get("alias", [])
            for name in names:
                by_name.setdefault(kebab(name.strip(":")), key)
    return by_name


def skin_variant_key(index: dict[str, EmojiInfo], base_key: str, tone: str) -> str | None:
    """Codepoints of `base_key` with skin tone `tone` (single or two-person form)."""
    parts = base_key.split("-")
    candidates = []
    if "200d" in parts:
        # Skin tones go after each person in a ZWJ sequence.
        people = {"1f9d1", "1f468", "1f469", "1f466", "1f467", "1f9d2"}
        candidates.append("-".join(p + ("-" + tone if p in people else "") for p in parts))
    candidates.append("-".join([parts[0], tone, *parts[1:]]))
    for key in candidates:
        if key in index and index[key].skin:
            return key
    return None


def plan_fluent_svg(
    npm: Path, index: dict[str, EmojiInfo], seed: int, copies: int, skipped: Skipped
):
    package = npm / NPM_FLUENT_SVG
    source = f"npm:{NPM_FLUENT_SVG}@{npm_version(package)}"
    by_name = fluent_name_index(index)
    for folder, style in FLUENT_SVG_STYLES.items():
        files = sorted((package / "icons" / folder).glob("*.svg"))
        stems = {f.stem for f in files}
        seen: set[str] = set()
        for path in files:
            name, tone = path.stem, None
            for suffix, modifier in FLUENT_SKIN_SUFFIXES.items():
                base = path.stem.removesuffix("-" + suffix)
                # Only names that come in a '-default' version carry a skin tone suffix
                # ('horizontal-traffic-light' is not 'horizontal-traffic' in light skin).
                if base != path.stem and f"{base}-default" in stems:
                    name, tone = base, modifier
                    break
            name = FLUENT_NAME_FIXES.get(name, name)
            key = by_name.get(name)
            if key is None:
                skipped[f"{style}: name not matched"].append(path.name)
                continue
            if tone is not None:
                key = skin_variant_key(index, key, tone)
                if key is None:
                    skipped[f"{style}: skin tone not matched"].append(path.name)
                    continue
            if key in seen:
                skipped[f"{style}: duplicate"].append(path.name)
                continue
            seen.add(key)
            yield from emoji_samples(
                style, key, index[key], "svg", path, source, "MIT", seed, copies
            )


def deb_version(package_root: Path) -> str:
    control = (package_root / "DEBIAN" / "control").read_text()
    return re.search(r"^Version: (.+)$", control, re.M).group(1).strip()


def plan_fashion(deb: Path, seed: int, per_class: int, skipped: Skipped) -> Iterator[Sample]:
    package = "dataset-fashion-mnist"
    root = deb / package
    source = f"deb:{package}={deb_version(root)}"
    licence = copyright_licence(root, package, "train-images-idx3-ubyte.gz")[0]
    rng = np.random.default_rng([seed, 1])
    for split in ("train", "t10k"):
        labels = read_idx(
            str(root / f"usr/share/datasets/fashion-mnist/{split}-labels-idx1-ubyte.gz")
        )
        for cls in range(10):
            chosen = np.flatnonzero(labels == cls)
            # Both files contribute in proportion to their size (60k / 10k).
            take = round(per_class * len(chosen) / 7000)
            for index in sorted(rng.choice(chosen, size=take, replace=False).tolist()):
                stem = f"fmnist_{split}_{index:05d}"
                item_rng = stable_rng(seed, stem)
                nouns = FASHION_CLASSES[cls]
                noun = choose(item_rng, nouns)
                text = choose(item_rng, FASHION_TEMPLATES).format(an=noun, n=noun.split(" ", 1)[-1])
                # One concept per image: Fashion-MNIST has no finer grouping than its 10 classes,
                # and splitting by class would leave whole garment types out of training.
                concept = f"fashion-mnist:{FASHION_CLASS_IDS[cls]}:{split}-{index:05d}"
                yield Sample(
                    file_name=f"fashion-mnist/{stem}.png",
                    text=text,
                    concept=concept,
                    source=source,
                    licence=licence,
                    style="greyscale-photo",
                    kind="fashion",
                    path=str(
                        root / f"usr/share/datasets/fashion-mnist/{split}-images-idx3-ubyte.gz"
                    ),
                    index=index,
                )


@lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic with dtype/ndim, then dims)."""
    data = gzip.decompress(Path(path).read_bytes())
    ndim = data[3]
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned byte IDX files are expected")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def copyright_licence(root: Path, package: str, file_name: str) -> tuple[str, str]:
    """(licence, copyright holder) for a file, from the package's Debian copyright file.

    Machine-readable copyright files name source-tree paths, not installed ones, so stanzas are
    matched by base name; a 'Files: *' stanza is the fallback.
    """
    text = (root / "usr/share/doc" / package / "copyright").read_text()
    fallback = ("", "")
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", stanza, re.M)
        licence = re.search(r"^License: *(\S+)", stanza, re.M)
        holder = re.search(r"^Copyright: *(.*)", stanza, re.M)
        if not files or not licence:
            continue
        patterns = files.group(1).split()
        found = (licence.group(1), holder.group(1).strip() if holder else "")
        if any(p.rsplit("/", 1)[-1] == file_name for p in patterns):
            return found
        if "*" in patterns:
            fallback = found
    if not fallback[0]:
        raise ValueError(f"{package}: no licence found for {file_name} in its copyright file")
    return fallback


def photo_slug(relative: str) -> str:
    """Short name of a photo: Plasma's folder name (its files are all called WxH.jpg), else stem."""
    path = Path(relative)
    return kebab(path.parents[2].name if "wallpapers/" in relative else path.stem)


def plan_photos(deb: Path, seed: int, crops_per_photo: int, skipped: Skipped) -> Iterator[Sample]:
    for package, relative, description in PHOTOS:
        root = deb / package
        path = root / relative
        licence, holder = copyright_licence(root, package, path.name)
        source = f"deb:{package}={deb_version(root)}:/{relative} (© {holder})"
        slug = photo_slug(relative)
        for crop_index in range(crops_per_photo):
            stem = f"photo_{slug}_{crop_index:04d}"
            rng = stable_rng(seed, stem)
            short_side = choose(rng, PHOTO_SHORT_SIDES)
            position = (rng.random(), rng.random())
            yield Sample(
                file_name=f"photo/{stem}.png",
                text=choose(rng, PHOTO_TEMPLATES).format(d=description),
                # All crops of one photograph stay in one split.
                concept=f"photo:{package}/{slug}",
                source=source,
                licence=licence,
                style="photo",
                kind="photo",
                path=str(path),
                short_side=short_side,
                position=position,
            )


# ---- rendering: pure functions of a Sample ----


@lru_cache(maxsize=8)
def load_raster(path: str) -> Image.Image:
    return load_image(Path(path)).convert("RGBA")


@lru_cache(maxsize=16)
def render_svg(path: str, size: int) -> Image.Image:
    import resvg_py  # build-time only dependency of this recipe

    png = resvg_py.svg_to_bytes(svg_path=path, width=size, height=size, skip_system_fonts=True)
    return decode_image(bytes(png), path).convert("RGBA")


@lru_cache(maxsize=len(PHOTO_SHORT_SIDES) + 1)
def load_photo_scaled(path: str, short_side: int) -> Image.Image:
    img = load_photo(path)
    scale = short_side / min(img.size)
    size = (max(SIZE, round(img.width * scale)), max(SIZE, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


@lru_cache(maxsize=1)
def load_photo(path: str) -> Image.Image:
    return load_image(Path(path)).convert("RGB")


def render(sample: Sample) -> Image.Image:
    if sample.kind in ("raster", "svg"):
        if sample.kind == "raster":
            sprite = load_raster(sample.path)
            if sprite.size != (sample.size, sample.size):
                # Pillow premultiplies alpha when resizing RGBA, so edges do not go dark.
                sprite = sprite.resize((sample.size, sample.size), Image.Resampling.LANCZOS)
        else:
            sprite = render_svg(sample.path, sample.size)
        canvas = Image.new("RGBA", (SIZE, SIZE), (*sample.background, 255))
        canvas.alpha_composite(sprite, sample.offset)
        return canvas.convert("RGB")
    if sample.kind == "fashion":
        pixels = read_idx(sample.path)[sample.index]
        return (
            Image.fromarray(pixels, "L")
            .resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            .convert("RGB")
        )
    if sample.kind == "photo":
        img = load_photo_scaled(sample.path, sample.short_side)
        left = round(sample.position[0] * (img.width - SIZE))
        top = round(sample.position[1] * (img.height - SIZE))
        return img.crop((left, top, left + SIZE, top + SIZE))
    raise ValueError(f"unknown sample kind {sample.kind}")


def write_sample(out: Path, sample: Sample) -> bool:
    """Write one image unless it is already there (resume); returns whether it wrote."""
    path = out / sample.file_name
    if path.exists():
        return False
    atomic_write_bytes(path, png_bytes(render(sample)))
    return True


def _write_chunk(args: tuple[str, list[Sample]]) -> int:
    out, samples = args
    return sum(write_sample(Path(out), s) for s in samples)


def check_not_reserved(*paths: Path) -> None:
    for path in paths:
        for name in RESERVED_NAMES:
            if name in str(path).lower():
                sys.exit(f"error: {path}: {name} is reserved for independent evaluation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npm", type=Path, default=Path("data/npm/node_modules"))
    parser.add_argument("--deb", type=Path, default=Path("data/deb"))
    parser.add_argument("--out", type=Path, default=Path("data/emoji_src"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colour-copies", type=int, default=2, help="Copies on flat colours.")
    parser.add_argument("--fashion-per-class", type=int, default=1000)
    parser.add_argument("--crops-per-photo", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="Processes (the CPU is shared).")
    parser.add_argument(
        "--limit", type=int, default=0, help="Only the first N samples (quick check)."
    )
    args = parser.parse_args(argv)
    check_not_reserved(args.npm, args.deb, args.out)
    console = Console()
    started = time.monotonic()

    index = load_emoji_index(args.npm / NPM_GOOGLE / "emoji.json")
    skipped: Skipped = defaultdict(list)
    samples: list[Sample] = []
    for plan in (
        plan_noto(args.npm, index, args.seed, args.colour_copies, skipped),
        plan_fluent_3d(args.npm, index, args.seed, args.colour_copies, skipped),
        plan_fluent_svg(args.npm, index, args.seed, args.colour_copies, skipped),
        plan_fashion(args.deb, args.seed, args.fashion_per_class, skipped),
        plan_photos(args.deb, args.seed, args.crops_per_photo, skipped),
    ):
        samples.extend(plan)
    console.print(f"planned {len(samples)} images in {time.monotonic() - started:.0f} s")
    if args.limit:
        samples = samples[:: max(1, len(samples) // args.limit)][: args.limit]
    names = [s.file_name for s in samples]
    if len(set(names)) != len(names):
        raise SystemExit("error: two samples share a file name")

    for folder in sorted({Path(s.file_name).parent for s in samples}):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    # Consecutive samples share a source image, so chunks keep the per-process caches warm.
    chunks = [samples[i : i + 64] for i in range(0, len(samples), 64)]
    written = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rendering", total=len(samples))
        if args.workers > 1:
            from multiprocessing import Pool

            with Pool(args.workers) as pool:
                jobs = [(str(args.out), chunk) for chunk in chunks]
                for chunk, count in zip(chunks, pool.imap(_write_chunk, jobs), strict=True):
                    written += count
                    progress.advance(task, len(chunk))
        else:
            for chunk in chunks:
                written += _write_chunk((str(args.out), chunk))
                progress.advance(task, len(chunk))

    columns_out = ("file_name", "text", "concept", "source", "licence", "style")
    lines = [
        json.dumps({k: getattr(s, k) for k in columns_out}, ensure_ascii=False) for s in samples
    ]
    atomic_write_bytes(args.out / "metadata.jsonl", ("\n".join(lines) + "\n").encode())

    table = Table(title=f"{args.out} ({len(samples)} images, {written} newly written)")
    for column in ("style", "source", "licence", "images", "concepts"):
        justify = "right" if column in ("images", "concepts") else "left"
        table.add_column(column, justify=justify, overflow="fold")
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        source = s.source.split(":/")[0]
        groups.setdefault((s.style, source, s.licence), []).append(s)
    for (style, source, licence), group in sorted(groups.items()):
        table.add_row(style, source, licence, str(len(group)), str(len({s.concept for s in group})))
    console.print(table)
    console.print(f"concepts in all: {len({s.concept for s in samples})}")
    for reason, names in sorted(skipped.items()):
        console.print(f"skipped ({reason}): {len(names)}: {', '.join(names[:8])}")
    console.print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
