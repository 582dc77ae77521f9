"""`inpaint report`: PNG plots of a training run, for spotting overfitting and instability.

- loss.png: negative ELBO (bits per hole dimension) on training batches vs the EMA model on the
  validation set, plus the gradient norm with the skip threshold and skipped updates.
- kl_per_layer.png: each latent layer's KL, train vs validation. A validation KL that keeps
  rising above the training KL of the same layer is the overfitting the original project saw
  in its lower layers; a KL stuck near zero is a layer the decoder ignores.
- samples.png: validation images with their hole, completions sampled from the exported EMA
  model (`run/model`), and the ground truth.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from inpaint_cli.errors import InpaintError, printable
from inpaint_cli.images import atomic_write_bytes, check_replaceable

GRID_IMAGES = 6
GRID_SAMPLES = 4
GRID_TEMPERATURE = 0.8
GRID_SEED = 0
PLOT_FILES = ("loss.png", "kl_per_layer.png", "samples.png")
# A PNG text chunk naming the writer: a plot carrying it is ours to replace on the next report,
# any other file of the same name is the user's (matplotlib alone marks its PNGs too).
REPORT_MARK = ("Source", "inpaint report")
# Fields the plots read as numbers; a log line with anything else in them is skipped.
PLOTTED_NUMBERS = (
    "loss",
    "nll_bits_per_dim",
    "fill_psnr_db",
    "grad_norm",
    "skip_threshold",
    "skipped_updates",
)


def _warn(message: str) -> None:
    print(f"warning: {printable(message)}", file=sys.stderr)


def _is_number(value: Any) -> bool:
    """A JSON number a plot can draw: not a bool, and within float range (JSON reads 1e999 as
    inf, but a 400-digit integer as an int that float() and math.isfinite refuse)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _is_log_record(record: Any) -> bool:
    """Whether a parsed line has the shape `inpaint train` logs: an integer step, the plotted
    fields numbers or null, the per-layer KL a list of them."""
    if not isinstance(record, dict):
        return False
    step, kl = record.get("step"), record.get("kl_bits_per_dim", [])
    if not isinstance(step, int) or not _is_number(step) or not isinstance(kl, list):
        return False
    values = [*(record.get(key) for key in PLOTTED_NUMBERS), *kl]
    return all(value is None or _is_number(value) for value in values)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log, skipping a line cut short by a killed process.

    A resumed run starts again from its last checkpoint, so what a killed process logged after
    that checkpoint is superseded: a step at or before the last one read drops those records,
    and the curves show the run that survived rather than a zigzag. Other unreadable lines
    (not UTF-8, not JSON, or JSON of another shape) are skipped too, with one warning for the
    file.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise InpaintError(f"{path}: cannot read ({error.strerror or error})", 1) from None
    records: list[dict[str, Any]] = []
    bad = 0
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError
        except (ValueError, RecursionError):
            if number < len(lines) and line.strip():  # a kill cuts the last line: not news
                bad += 1
            continue
        if not _is_log_record(record):
            bad += 1
            continue
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
        records.append(record)
    if bad:
        _warn(f"{path}: {bad} unreadable line{'s' * (bad > 1)} skipped")
    return records


def layer_labels(model_config: dict[str, Any], count: int) -> list[str]:
    """'4x4 #2'-style names in the model's top-down layer order (coarsest first)."""
    groups = model_config.get("latent_groups") or {}
    labels = []
    for size in sorted(groups, key=int):
        for index in range(int(groups[size])):
            labels.append(f"{size}x{size} #{index + 1}")
    if len(labels) != count:
        return [f"layer {index}" for index in range(count)]
    return labels


def _save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    key, value = REPORT_MARK
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={key: value})
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if _is_number(value) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_loss(train: list[dict[str, Any]], val: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    # runs from before validation scored the fill have no such records: two panels, not three
    fill_steps, fill_values = _series(val, "fill_psnr_db")
    rows = 3 if fill_steps else 2
    figure, axes = plt.subplots(rows, 1, figsize=(8, 3.5 * rows), sharex=True, layout="constrained")
    top, bottom = axes[0], axes[-1]
    steps, values = _series(train, "nll_bits_per_dim")
    top.plot(steps, values, label="train NLL (negative ELBO)", color="tab:blue", lw=1)
    steps, values = _series(train, "loss")
    top.plot(
        steps,
        values,
        label="train loss (as optimised: KL warm-up, fill loss)",
        color="tab:blue",
        lw=0.8,
        ls=":",
    )
    steps, values = _series(val, "nll_bits_per_dim")
    if steps:
        top.plot(steps, values, "o-", label="validation NLL (EMA)", color="tab:red", ms=3)
    top.set_ylabel("bits per hole dimension")
    top.set_title("Loss: train vs validation" if steps else "Loss (no validation: no --val-data)")
    top.legend()
    top.grid(alpha=0.3)

    if fill_steps:
        axes[1].plot(fill_steps, fill_values, "o-", color="tab:purple", ms=3)
        axes[1].set_ylabel("dB")
        axes[1].set_title("Validation: hole PSNR of the T=0 fill `inpaint run` writes (EMA)")
        axes[1].grid(alpha=0.3)

    steps, values = _series(train, "grad_norm")
    bottom.plot(steps, values, label="gradient norm", color="tab:green", lw=1)
    steps, values = _series(train, "skip_threshold")
    bottom.plot(steps, values, label="skip threshold", color="tab:gray", ls="--", lw=1)
    steps, counts = _series(train, "skipped_updates")
    skipped_at = [
        step
        for step, earlier, later in zip(steps[1:], counts, counts[1:], strict=False)
        if later > earlier
    ]
    for index, step in enumerate(skipped_at):
        bottom.axvline(
            step, color="tab:orange", lw=0.8, label="skipped updates" if not index else None
        )
    if any(value > 0 for value in _series(train, "grad_norm")[1]):
        bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("norm")
    bottom.legend()
    bottom.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_kl(
    train: list[dict[str, Any]], val: list[dict[str, Any]], labels: list[str], path: Path
) -> None:
    import matplotlib.pyplot as plt

    count = len(labels)
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.2 * columns, 2.6 * rows),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for layer, label in enumerate(labels):
        axis = axes[layer // columns][layer % columns]
        for records, name, style in ((train, "train", "-"), (val, "validation (EMA)", "o-")):
            steps = [r["step"] for r in records if _layer_value(r, layer) is not None]
            values = [_layer_value(r, layer) for r in records if _layer_value(r, layer) is not None]
            axis.plot(steps, values, style, label=name, ms=3, lw=1)
        axis.set_title(label, fontsize=9)
        axis.grid(alpha=0.3)
        if layer == 0:
            axis.legend(fontsize=7)
    for extra in range(count, rows * columns):
        axes[extra // columns][extra % columns].axis("off")
    figure.suptitle("KL per latent layer (bits per hole dimension), train vs validation")
    figure.supxlabel("step")
    _save_figure(figure, path)


def _layer_value(record: dict[str, Any], layer: int) -> float | None:
    values = record.get("kl_bits_per_dim")
    if not isinstance(values, list) or layer >= len(values):
        return None
    value = values[layer]
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _is_local_path(url: str) -> bool:
    """Whether webdataset's gopen would open `url` as a plain file: it runs the command of a
    `pipe:` URL, fetches http(s), gs, hf, ... URLs with curl or gsutil, and reads stdin for
    '-'. Any scheme counts as not local, as gopen reads it."""
    try:
        return url != "-" and not urlparse(url).scheme
    except ValueError:  # a malformed URL ("http://[x"): not a file either
        return False


def latest_config(run: dict[str, Any]) -> dict[str, Any]:
    """The training config in force at the run's newest resume (each records its own: the
    validation shards may have moved), else the one it started with."""
    resumes = run.get("resumes")
    if isinstance(resumes, list):
        for entry in reversed(resumes):
            if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
                return entry["config"]
    config = run.get("config")
    return config if isinstance(config, dict) else {}


def _local_sample_shards(run_dir: Path, config: dict[str, Any]) -> list[str] | None:
    """The validation shards (else the training ones) that run.json names, or None, after a
    warning, when one is not a local path. A run folder may come from someone else: reading it
    must never run a command or fetch from a URL it names. A relative path (run.json of older
    runs) is read from the current folder."""
    from inpaint_cli.data import expand_urls

    key = "val_data" if config.get("val_data") else "data"
    urls = expand_urls(config.get(key))
    foreign = next((url for url in urls if not _is_local_path(url)), None)
    if foreign is None:
        return urls
    _warn(
        f"{run_dir / 'run.json'}: config.{key} names {foreign!r}, not a local shard file; "
        "a report never runs commands or opens URLs from a run folder; sample grid skipped"
    )
    return None


def plot_samples(run_dir: Path, run: dict[str, Any], path: Path) -> bool:
    """Completions of the first validation images by the exported EMA model, center holes.

    Returns False, after a warning, when the grid is skipped because run.json names shards
    that are not local files.
    """
    import matplotlib.pyplot as plt
    import torch

    from inpaint_cli.data import eval_loader
    from model.hvae import HVAE

    config = latest_config(run)
    urls = _local_sample_shards(run_dir, config)
    if urls is None:
        return False
    try:
        model = HVAE.from_pretrained(run_dir / "model")
    except ValueError as error:
        raise InpaintError(str(error), exit_code=1) from None
    kinds = str(config.get("mask_kinds", "center")).split(",")
    kind = "center" if "center" in kinds else kinds[0]
    loader = eval_loader(
        urls,
        model.config.resolution,
        GRID_IMAGES,
        seed=int(config.get("seed", 0)),
        mask_kind=kind,
        background=str(config.get("background", "white")),
    )
    batch = next(iter(loader), None)
    if batch is None:
        raise InpaintError(f"{urls}: no validation images for the sample grid", exit_code=1)
    embedding, keep = None, None
    if model.config.caption_dim > 0:
        embedding = batch.get("caption_embedding")
        if embedding is None:
            from conditioning import TextEncoder

            try:
                encoder = TextEncoder(config.get("text_encoder"))
            except ValueError as error:  # TextEncoderError names the encoder's path
                raise InpaintError(str(error), exit_code=1) from None
            embedding = encoder.encode(list(batch["caption"]))
        keep = torch.tensor([bool(caption) for caption in batch["caption"]]).float()
    image, mask = batch["image"], batch["mask"]
    generator = torch.Generator().manual_seed(GRID_SEED)
    filled = model.inpaint(
        image,
        mask,
        embedding,
        samples=GRID_SAMPLES,
        temperature=GRID_TEMPERATURE,
        generator=generator,
        caption_keep=keep,
    )
    shown = image * (1 - mask) + mask * 0.0  # the hole as mid-grey

    def to_pixels(tensor: torch.Tensor) -> Any:
        return ((tensor + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()

    rows, columns = image.shape[0], GRID_SAMPLES + 2
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.6 * rows), squeeze=False, layout="constrained"
    )
    for row in range(rows):
        cells = [shown[row], *filled[row], image[row]]
        for column, cell in enumerate(cells):
            axis = axes[row][column]
            axis.imshow(to_pixels(cell), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                title = ("masked input", *(f"sample {i + 1}" for i in range(GRID_SAMPLES)), "truth")
                axis.set_title(title[column], fontsize=8)
        caption = batch["caption"][row] if "caption" in batch else ""
        if caption:
            axes[row][0].set_ylabel(caption[:28], fontsize=6)
    images = "validation" if config.get("val_data") else "training (the run had no --val-data)"
    figure.suptitle(f"EMA model, temperature {GRID_TEMPERATURE}, {images} images", fontsize=9)
    _save_figure(figure, path)
    return True


def _written_by_report(path: Path) -> bool:
    """Whether `path` is a plot an earlier `inpaint report` wrote (it carries REPORT_MARK)."""
    from PIL import Image

    key, value = REPORT_MARK
    try:
        with Image.open(path) as image:  # reads the header and the text chunks before the pixels
            return image.info.get(key) == value
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False  # not an image, a damaged or a huge one: not ours


def write_report(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write loss.png, kl_per_layer.png and samples.png for a run folder; returns their paths.

    A sample grid that fails (damaged model, missing shards) raises after the curves are written.
    """
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "plots"
    if not run_dir.is_dir():
        problem = "not a run folder" if run_dir.exists() else "no such run folder"
        raise InpaintError(f"{run_dir}: {problem}")
    train = read_jsonl(run_dir / "train.jsonl")
    if not train:
        raise InpaintError(f"{run_dir}: no train.jsonl records (not an `inpaint train` run?)")
    val = read_jsonl(run_dir / "val.jsonl")
    run: dict[str, Any] = {}
    if (run_dir / "run.json").is_file():
        try:
            run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise InpaintError(f"{run_dir / 'run.json'}: unreadable ({error})", 1) from None
        if not isinstance(run, dict) or not all(
            isinstance(run.get(key, {}), dict) for key in ("config", "model_config")
        ):
            raise InpaintError(f"{run_dir / 'run.json'}: not a run record of `inpaint train`", 1)
    if out.resolve() != (run_dir / "plots").resolve():
        # The run's own plots/ folder holds only report's plots, tagged or not.
        check_replaceable(out, PLOT_FILES, _written_by_report, "inpaint report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InpaintError(f"{out}: cannot create ({error.strerror})", exit_code=1) from None

    written = []
    plot_loss(train, val, out / "loss.png")
    written.append(out / "loss.png")
    layers = next((len(r["kl_bits_per_dim"]) for r in train if r.get("kl_bits_per_dim")), 0)
    if layers:
        labels = layer_labels(run.get("model_config", {}), layers)
        plot_kl(train, val, labels, out / "kl_per_layer.png")
        written.append(out / "kl_per_layer.png")
    if (run_dir / "model").is_dir() and run.get("config"):
        try:
            if plot_samples(run_dir, run, out / "samples.png"):
                written.append(out / "samples.png")
        except InpaintError as error:
            # The curves are written and stay; the exit code still says the report is incomplete.
            raise InpaintError(
                f"{error}; sample grid skipped (the curves are in {out})", exit_code=1
            ) from None
    else:
        _warn(f"{run_dir}: no exported model or run.json; sample grid skipped")
    return written
