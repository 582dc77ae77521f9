"""The `inpaint` command line: thin Typer commands over library functions.

Nothing heavy is imported at module level: `inpaint --help` must not import torch,
transformers or datasets. Each command imports its job module inside its body.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from inpaint_cli.errors import InpaintError, is_another_rank, launched_processes

app = typer.Typer(
    name="inpaint",
    help="Fill holes in images with a hierarchical VAE, optionally guided by a caption.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _call(job: Callable[[], Any]) -> Any:
    """Run a job; report an InpaintError as one line on stderr and exit with its code."""
    try:
        return job()
    except InpaintError as error:
        # the same stop on every process of a launched job is said once, by the first
        if not (error.every_rank and is_another_rank()):
            typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        if not is_another_rank():  # a terminal's Ctrl-C reaches every process
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except RuntimeError as error:
        lost = lost_peer_message(error)
        if lost is None:
            raise
        typer.echo(f"error: {lost}", err=True)
        raise typer.Exit(1) from None


# How gloo and NCCL report that another process of the job is gone.
_PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                  "NCCL", "ProcessGroup", "Socket Timeout")  # fmt: skip


def lost_peer_message(error: BaseException) -> str | None:
    """One line for a collective that failed because another process of a launched job died
    (killed, out of memory), instead of the long traceback; None for anything else."""
    text = str(error)
    if launched_processes() <= 1:
        return None
    if not any(marker in text for marker in _PEER_FAILURES):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (
        f"another process of this job stopped ({first[:200]}); what was finished is on disk "
        "(checkpoints, outputs): run the command again, inpaint train with --resume"
    )


def _caption_strength_option(help_text: str) -> Any:
    return typer.Option(None, min=0.0, max=4.0, help=help_text, show_default=False)


@app.command()
def shards(
    src: Path = typer.Argument(
        ..., metavar="SRC", help="Image folder, saved HF dataset, or parquet file/folder."
    ),
    out: Path = typer.Argument(..., metavar="OUT", help="Output folder for the tar shards."),
    splits: str = typer.Option(
        "train=1.0", help="Named split fractions, e.g. train=0.9,val=0.05,test=0.05."
    ),
    split_by: str | None = typer.Option(
        None, help="Metadata column that keeps a group in one split (default: the file stem)."
    ),
    max_count: int = typer.Option(1000, min=1, help="Most samples per shard."),
    max_size: int = typer.Option(1 << 30, min=1, help="Most bytes per shard."),
    image_column: str = typer.Option("image", help="Image column of an HF dataset or parquet."),
    text_column: str = typer.Option("text", help="Caption column of an HF dataset or parquet."),
    embed_captions: bool = typer.Option(
        False, help="Also store each caption's embedding (default text encoder) in the shard."
    ),
    text_encoder: str | None = typer.Option(
        None, help="With --embed-captions: local path of a transformers text encoder."
    ),
) -> None:
    """Pack an image folder (captions from metadata.jsonl/csv, sidecar .txt, or none) into
    webdataset tar shards, split by a hash of a grouping column. Interrupted? Run the same
    command again: complete shards are kept and only the rest is packed.

    Example: `inpaint shards photos/ shards/ --splits train=0.9,val=0.05,test=0.05`
    """
    from inpaint_cli.shards import format_summary, write_shards

    summary = _call(
        lambda: write_shards(
            src,
            out,
            splits=splits,
            split_by=split_by,
            max_count=max_count,
            max_size=max_size,
            image_column=image_column,
            text_column=text_column,
            embed_captions=embed_captions,
            text_encoder=text_encoder,
        )
    )
    for line in format_summary(summary):
        typer.echo(line)
    if summary["skipped"]:  # what could be packed is written; the exit code says some was not
        raise typer.Exit(1)


@app.command()
def masks(
    images: Path = typer.Argument(..., metavar="IMAGES", help="Image file or folder (recursive)."),
    out: Path = typer.Argument(
        ..., metavar="OUT", help="Folder for the masks: one PNG per image, same stem."
    ),
    kind: str = typer.Option("center", help="center, box or stroke."),
    hole_area: str = typer.Option("0.1-0.5", help="Hole area range for box and stroke."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, help="Replace existing masks."),
) -> None:
    """Write one mask per image (white = hole, same size) to try `inpaint run` on your folder.

    Example: `inpaint masks photos/ masks/ --kind stroke --seed 1`
    """
    from inpaint_cli.masks import write_masks

    summary = _call(
        lambda: write_masks(
            images, out, kind=kind, hole_area=hole_area, seed=seed, overwrite=overwrite
        )
    )
    typer.echo(
        f"wrote {summary['written']} masks to {summary['out']} "
        f"({summary['skipped']} already there, {summary['failed']} failed)"
    )
    if summary["failed"]:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": False})
def train(
    data: str = typer.Option(..., help="Training shards: brace pattern, list, or pipe: URL."),
    val_data: str | None = typer.Option(
        None,
        help="Validation shards. If no image decodes, training stops with an error (at the "
        "start, or after checkpointing the step whose validation failed).",
    ),
    out: Path = typer.Option(..., help="Run folder (checkpoints, logs, config)."),
    preset: str = typer.Option("small", help="Model preset: tiny, small or base."),
    model_config: list[str] = typer.Option(
        [],
        "--model-config",
        help="Replace a preset field, KEY=VALUE (JSON value), repeatable: e.g. "
        "--model-config norm=group --model-config pixel_distribution=gaussian.",
    ),
    steps: int = typer.Option(10000, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(32, min=1, help="Batch size per process."),
    grad_accum: int = typer.Option(1, min=1, help="Gradient accumulation steps."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (above 0)."),
    warmup_steps: int = typer.Option(500, min=0, help="Linear warm-up, then cosine decay."),
    seed: int = typer.Option(0, help="Seed for weights, data order and masks."),
    mask_kinds: str = typer.Option("center,box,stroke", help="Hole kinds drawn for training."),
    hole_area: str = typer.Option("0.1-0.5", help="Hole area range (fraction of the image)."),
    val_every: int = typer.Option(500, min=1, help="Validate every V steps."),
    val_samples: int = typer.Option(256, min=1, help="Validation images per validation."),
    patience: int = typer.Option(
        0,
        min=0,
        help="Stop once this many validations in a row gave no new best NLL (0: run every step).",
    ),
    checkpoint_every: int = typer.Option(500, min=1, help="Checkpoint every K steps."),
    checkpoint_minutes: float = typer.Option(
        10.0,
        min=0.0,
        help="Also checkpoint when this many minutes passed since the last one; 0 turns this off "
        "(--checkpoint-every 1 saves every step).",
    ),
    keep_last: int = typer.Option(3, min=1, help="Checkpoints kept (plus the best)."),
    mixed_precision: str = typer.Option("no", help="no, bf16 or fp16 (fp16 needs a GPU)."),
    captions: bool = typer.Option(True, help="Train with caption conditioning."),
    caption_dropout: float = typer.Option(0.1, min=0.0, max=1.0, help="Caption dropout rate."),
    condition_all_layers: bool = typer.Option(
        False, help="Condition every latent group on the caption, not only the top one."
    ),
    fill_loss: float = typer.Option(
        0.0,
        min=0.0,
        help="Add this weight times the hole's squared error of the T=0 fill (what `inpaint "
        "run` writes) to the loss; costs one more decoder pass per step.",
    ),
    text_encoder: str | None = typer.Option(None, help="Local path of a text encoder."),
    init: str | None = typer.Option(
        None,
        help="Start from the weights of a model folder (an export, a run's best/, or 'bundled' "
        "for the bundled model) instead of random ones; its config.json fixes the architecture.",
    ),
    num_workers: int = typer.Option(2, min=0, help="Data loader workers per process."),
    background: str = typer.Option(
        "white",
        help="Colour under transparent pixels: white, black, or random (a flat colour per image).",
    ),
    resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint."),
) -> None:
    """Train the hierarchical VAE on webdataset shards with Accelerate.

    The same command runs on CPU, one GPU, or many under `accelerate launch`.

    Example: `inpaint train --data 'shards/train-{000000..000009}.tar' --val-data
    'shards/val-000000.tar' --out runs/emoji --preset small --steps 20000 --mixed-precision bf16`
    """
    from inpaint_cli.train import TrainConfig, parse_model_config
    from inpaint_cli.train import train as run_training

    if init == "bundled":
        from model.hvae import default_model_path

        init = str(default_model_path())

    config = TrainConfig(
        data=data,
        val_data=val_data,
        out=str(out),
        preset=preset,
        model_config=_call(lambda: parse_model_config(model_config)),
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        seed=seed,
        mask_kinds=mask_kinds,
        hole_area=hole_area,
        val_every=val_every,
        val_samples=val_samples,
        patience=patience,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes,
        keep_last=keep_last,
        mixed_precision=mixed_precision,
        captions=captions,
        caption_dropout=caption_dropout,
        condition_all_layers=condition_all_layers,
        fill_loss=fill_loss,
        text_encoder=text_encoder,
        init=init,
        num_workers=num_workers,
        background=background,
        resume=resume,
        command_line=list(sys.argv),
    )
    _call(lambda: run_training(config))


@app.command()
def run(
    images: Path = typer.Argument(..., metavar="IMAGES", help="Image file or folder (recursive)."),
    masks: Path = typer.Option(..., help="Mask folder (same stem, or STEM_mask*.png) or file."),
    out: Path = typer.Option(..., help="Output folder."),
    model: Path | None = typer.Option(None, help="Model folder (default: bundled model)."),
    samples: int = typer.Option(1, min=1, help="Completions per image."),
    temperature: float | None = typer.Option(
        None,
        min=0.0,
        help="Prior temperature. Default: 0 for one fill (closest on average), 0.8 for several.",
        show_default=False,
    ),
    seed: int = typer.Option(0, help="Random seed."),
    batch_size: int = typer.Option(16, min=1, help="Windows per model call."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    caption: str | None = typer.Option(None, help="One caption for every image."),
    caption_file: Path | None = typer.Option(None, help="metadata.jsonl or CSV captions."),
    caption_strength: float | None = _caption_strength_option(
        "Mix of caption and empty caption, 0..4 (default: the model's, in its config.json)."
    ),
    resize_masks: bool = typer.Option(False, help="Resize masks of another size (nearest)."),
    dilate: int = typer.Option(0, min=0, help="Grow holes by this many pixels."),
    overwrite: bool = typer.Option(False, help="Redo existing outputs."),
    save_mask_overlay: bool = typer.Option(False, help="Write STEM_overlay.png."),
    save_uncertainty: bool = typer.Option(False, help="Write STEM_uncertainty.png."),
    grid: Path | None = typer.Option(None, help="Write a contact sheet to this PNG."),
    strict: bool = typer.Option(False, help="Stop at the first failure."),
    dry_run: bool = typer.Option(False, help="List what would be done, do nothing."),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding/encoding workers."),
    text_encoder: str | None = typer.Option(
        None, help="Local path of the text encoder a caption model was trained with."
    ),
) -> None:
    """Fill every hole in a folder of images, in batches, resumably.

    Example: `inpaint run photos/ --masks masks/ --out filled/ --samples 4 --grid grid.png`
    """
    from inpaint_cli.run import RunOptions, run_folder

    options = RunOptions(
        images=images,
        masks=masks,
        out=out,
        model=model,
        samples=samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        device=device,
        caption=caption,
        caption_file=caption_file,
        caption_strength=caption_strength,
        resize_masks=resize_masks,
        dilate=dilate,
        overwrite=overwrite,
        save_mask_overlay=save_mask_overlay,
        save_uncertainty=save_uncertainty,
        grid=grid,
        strict=strict,
        dry_run=dry_run,
        json_summary=json_summary,
        num_workers=num_workers,
        text_encoder=text_encoder,
    )
    summary = _call(lambda: run_folder(options))
    if summary is not None and summary.get("failed", 0):
        raise typer.Exit(1)


@app.command(name="eval")
def evaluate(
    data: str = typer.Option(..., help="Shards (pattern) or an image folder."),
    model: Path | None = typer.Option(None, help="Model folder (default: bundled model)."),
    masks: str = typer.Option("center", help="center, box, stroke or a mask folder."),
    samples: int = typer.Option(8, min=1, help="Samples per image (K)."),
    temperature: float = typer.Option(
        0.8, min=0.0, help="Prior temperature of the K samples (the T=0 fill is always scored)."
    ),
    hole_area: str = typer.Option("0.1-0.5", help="Hole area range for box and stroke masks."),
    resize_masks: bool = typer.Option(
        False, help="Resize a mask folder's masks to their image's size (as inpaint run)."
    ),
    baselines: bool = typer.Option(False, help="Also score classical fills."),
    caption_ablation: bool = typer.Option(
        False, help="Hole NLL with true/empty/shuffled captions."
    ),
    out: Path = typer.Option(Path("report"), help="Report folder."),
    limit: int = typer.Option(0, min=0, help="Score at most this many images (0: all)."),
    batch_size: int = typer.Option(32, min=1, help="Batch size."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    text_encoder: str | None = typer.Option(None, help="Local path of a text encoder."),
    caption_strength: float | None = _caption_strength_option(
        "Mix of caption and empty caption, 0..4 (default: the model's, in its config.json)."
    ),
) -> None:
    """Score a model (hole NLL, PSNR, SSIM, L1, diversity) against classical baselines.

    Example: `inpaint eval --data 'shards/test-{000000..000001}.tar' --masks center
    --samples 8 --baselines --caption-ablation --out report/`
    """
    from inpaint_cli.evaluate import EvalOptions, print_summary
    from inpaint_cli.evaluate import evaluate as run_eval
    from inpaint_cli.masks import parse_hole_area

    area = _call(lambda: parse_hole_area(hole_area))
    options = EvalOptions(
        data=data,
        model=model,
        masks=masks,
        samples=samples,
        temperature=temperature,
        hole_area=area,
        resize_masks=resize_masks,
        baselines=baselines,
        caption_ablation=caption_ablation,
        out=out,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        device=device,
        text_encoder=text_encoder,
        caption_strength=caption_strength,
    )
    result = _call(lambda: run_eval(options))
    print_summary(result)
    if result["skipped"]:  # the report covers the rest; the exit code says it is not all
        typer.echo(f"warning: {result['skipped']} images skipped (see the warnings)", err=True)
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="Run folder written by `inpaint train`."
    ),
    out: Path | None = typer.Option(None, help="Where to write the plots (default: run/plots)."),
) -> None:
    """Plot a training run: loss and per-layer KL, train vs validation, and sample grids.

    Example: `inpaint report runs/emoji`
    """
    from inpaint_cli.report import write_report

    written = _call(lambda: write_report(run_dir, out))
    for path in written:
        typer.echo(str(path))


@app.command()
def export(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="Run folder written by `inpaint train`."
    ),
    out: Path = typer.Option(..., help="Model folder to write (config.json, model.safetensors)."),
    step: int | None = typer.Option(
        None, help="Checkpoint step (default: the best by validation NLL, else the newest)."
    ),
    caption_strength: float | None = _caption_strength_option(
        "Caption strength to record in the model's config (default 1: as trained)."
    ),
) -> None:
    """Turn one checkpoint's EMA weights into a model folder for `inpaint run --model`.

    Example: `inpaint export runs/emoji --step 8500 --out models/emoji-8500`
    """
    from inpaint_cli.checkpoint import export_model

    folder = _call(lambda: export_model(run_dir, out, step, caption_strength))
    typer.echo(f"wrote {out} from {folder}")


def main() -> None:
    # OpenMP threads spin while they wait by default; on a shared or busy machine that made
    # 2-thread inference up to 20x slower (benchmarks/). Passive waiting changes no result.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(run_app(sys.argv[1:]))


def run_app(args: list[str]) -> int:
    """Run the command line on `args` and return its exit code. A usage error (an unknown or
    missing option, a value out of range) is one `error:` line, like every other bad input,
    rather than Typer's framed box, so that scripts can log and parse it."""
    # Typer raises click's exceptions, or since 0.24 those of its own copy of click
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(args=args, prog_name="inpaint", standalone_mode=False)
    except usage_error as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # a bare command: its help
            if error.format_message().strip():  # Typer's rich help is printed, not returned
                typer.echo(error.format_message())
            return error.exit_code
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "inpaint"
        message = " ".join(error.format_message().split())
        typer.echo(f"error: {command}: {message} (see {command} --help)", err=True)
        return error.exit_code
    except typer.Abort:  # end of input at a prompt
        typer.echo("aborted", err=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
