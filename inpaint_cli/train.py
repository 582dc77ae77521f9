"""`inpaint train`: train the hierarchical VAE on webdataset shards with Accelerate.

One loop, read top to bottom: set up -> (resume) -> for each step: micro-batches, backward,
clip, decide on the all-reduced loss and gradient norm whether to apply or skip the update,
EMA, log, validate, checkpoint -> export the EMA model.

The same code runs in one process or under `accelerate launch` / `torchrun`. Only the model and
optimizer go through `accelerator.prepare()`: the webdataset loaders already give every rank its
own shards (`split_by_node`), and Accelerate would shard each batch again on top of that.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpaint_cli import checkpoint as ckpt
from inpaint_cli.errors import InpaintError, launched_processes
from inpaint_cli.images import atomic_write_bytes, output_lock
from inpaint_cli.metrics import PSNR_CAP_DB

MIXED_PRECISION = ("no", "bf16", "fp16")
KEYS_RECORDED_PER_RANK = 64
# --captions on data without a single caption in this many samples (per process) is warned
# about once: a cheap check that catches shards made without captions
CAPTION_CHECK_SAMPLES = 256


@dataclass
class TrainConfig:
    """Everything a training run depends on; recorded in run.json and in every checkpoint.

    The first block mirrors the `inpaint train` options. The second block has no command-line
    option: defaults that follow VDVAE and the design notes, changeable from Python.
    """

    data: str
    out: str
    val_data: str | None = None
    preset: str = "small"
    steps: int = 10000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 500
    seed: int = 0
    mask_kinds: str = "center,box,stroke"
    hole_area: str = "0.1-0.5"
    val_every: int = 500
    val_samples: int = 256
    # stop once this many validations in a row brought no new best NLL (0: run all the steps)
    patience: int = 0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0  # 0: no time-based checkpoints
    keep_last: int = 3
    mixed_precision: str = "no"
    captions: bool = True
    caption_dropout: float = 0.1
    condition_all_layers: bool = False  # the caption reaches every latent group, not the top one
    # weight of the squared error of the T=0 fill (what `inpaint run` writes) added to the ELBO
    fill_loss: float = 0.0
    # model config fields replaced on top of the preset, e.g. {"norm": "group"} (--model-config)
    model_config: dict[str, Any] = field(default_factory=dict)
    text_encoder: str | None = None
    # a model folder (config.json + model.safetensors) whose weights the run starts from, e.g.
    # the bundled model: its config fixes the architecture and the caption path
    init: str | None = None
    num_workers: int = 2
    background: str = "white"
    resume: bool = False
    command_line: list[str] = field(default_factory=list)

    weight_decay: float = 0.01
    adam_beta2: float = 0.9  # VDVAE: a short second-moment memory reacts to KL spikes sooner
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    grad_clip: float = 200.0  # fixed cap (VDVAE's value); see SkipRule for the relative clip
    clip_factor: float = 3.0
    skip_factor: float = 10.0
    skip_window: int = 100
    skip_min_history: int = 20
    ema_decay: float = 0.999
    kl_warmup_steps: int | None = None  # per-layer ramp; None: see default_kl_warmup
    log_every: int = 10


@dataclass
class TrainHooks:
    """Seams for fault-injection tests; normal runs pass none.

    after_backward(step, model): called once the step's gradients exist, before clipping and the
        skip decision (a test sets an Inf or scales the gradients here).
    after_step(step): called when `step` steps are done, after that step's checkpoint (a test
        raises here to simulate a process killed at that point).
    """

    after_backward: Callable[[int, torch.nn.Module], None] | None = None
    after_step: Callable[[int], None] | None = None


# ---- small pure pieces (each has its own test) --------------------------------------------------


class StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's time limit, a preemption) asks training to stop: the
    step in progress finishes, every rank checkpoints it, and the job exits, so no work since
    the last periodic checkpoint is lost. A second signal stops at once, as before (the last
    checkpoint stays valid: checkpoints are written whole or not at all).

    Only a Ctrl-C more than REPEAT_SECONDS after the first signal forces: under `accelerate
    launch` a Ctrl-C reaches each rank twice, from the terminal and forwarded by the launcher,
    which then waits 30 s before it kills. A repeated SIGTERM never forces; its sender escalates
    to SIGKILL itself. Signal handlers can only be set in the main thread; elsewhere signals act
    as they would."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 1.0

    def __init__(self) -> None:
        self.received: int | None = None
        self._since = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._since = signum, now
        elif signum == signal.SIGINT and now - self._since > self.REPEAT_SECONDS:
            self.__exit__()
            raise KeyboardInterrupt

    def __exit__(self, *_exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


def kl_warmup_weights(step: int, num_layers: int, warmup_steps: int) -> list[float]:
    """Per-layer KL weights, staggered as in the original project (ift6266).

    Layer i (in the model's top-down order) ramps linearly from 0 to 1 over `warmup_steps` steps,
    starting at step i * warmup_steps / 2, so the top layers learn to carry information before
    the lower, skip-connected layers are allowed to explain everything.
    """
    if warmup_steps <= 0:
        return [1.0] * num_layers
    return [
        min(1.0, max(0.0, (step - layer * warmup_steps / 2) / warmup_steps))
        for layer in range(num_layers)
    ]


def default_kl_warmup(steps: int, num_layers: int) -> int:
    """Ramp length so that the last layer reaches weight 1 by 5% of the run (at most 1,000 steps).

    Longer ramps were measured to hurt: with the last ramps ending at a quarter of a 2,500-step
    run, the 32x32 latents copied the hole (KL 15 bits/dim, validation NLL 25 bits/dim at step
    370) while their weight was still zero, and the decoder learned to depend on them.
    """
    finish = min(1000, steps // 20)
    return max(0, 2 * finish // (num_layers + 1))


def learning_rate(
    step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """Linear warm-up to `peak`, then cosine decay to `min_ratio * peak` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = peak * min_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


class SkipRule:
    """Clip and skip thresholds from the recent all-reduced gradient norms.

    Non-finite loss or gradient norm: the update is always skipped. Otherwise an update is
    skipped when its gradient norm exceeds `factor` times the median of the last `window` finite
    norms (once `min_history` are known), and gradients are clipped to `clip_factor` times that
    median (never above the fixed `grad_clip` cap).

    Why relative thresholds: VDVAE uses fixed ones (clip 200, skip 400), and a skip threshold
    below the typical gradient norm stops training for good; the norm here also shrinks by an
    order of magnitude as training goes on, so a fixed clip would stop mattering. Skipped norms
    enter the window too, so a lasting rise of the norm (which a fixed threshold would refuse
    forever) becomes the new median after at most window / 2 skips, while an isolated spike
    never moves the median.
    """

    def __init__(
        self, factor: float, window: int, min_history: int, clip_factor: float, grad_clip: float
    ) -> None:
        self.factor = factor
        self.min_history = min_history
        self.clip_factor = clip_factor
        self.grad_clip = grad_clip
        self.history: deque[float] = deque(maxlen=window)

    def _median(self) -> float | None:
        if len(self.history) < self.min_history:
            return None
        return statistics.median(self.history)

    def threshold(self) -> float | None:
        median = self._median()
        return None if median is None else self.factor * median

    def clip_norm(self) -> float:
        median = self._median()
        return self.grad_clip if median is None else min(self.grad_clip, self.clip_factor * median)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """ "nonfinite", "spike", or None to apply the update."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        threshold = self.threshold()
        self.history.append(grad_norm)
        if threshold is not None and grad_norm > threshold:
            return "spike"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(value) for value in state["history"])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


def ema_decay_at(updates: int, decay: float) -> float:
    """Shorter averaging at the start (as TensorFlow's EMA with num_updates): short runs and
    the first thousand steps are not dominated by the random initial weights."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def caption_keep(captions: list[str], dropout: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) float: 1 keeps the caption, 0 replaces it by the model's learned empty caption.

    One random draw per sample every step, whatever the rate, so the random stream (and with it
    an exact resume) does not depend on the captions. Empty captions always count as dropped.
    """
    draws = torch.rand(len(captions), generator=generator)
    present = torch.tensor([bool(caption) for caption in captions])
    return ((draws >= dropout) & present).float()


# ---- set-up helpers ------------------------------------------------------------------------------


def _validated(config: TrainConfig) -> tuple[list[str], tuple[float, float]]:
    from inpaint_cli.data import BACKGROUNDS
    from inpaint_cli.masks import MASK_KINDS, parse_hole_area

    kinds = [kind.strip() for kind in config.mask_kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in MASK_KINDS]
    if not kinds or unknown:
        raise InpaintError(
            f"--mask-kinds: unknown kind {unknown[0] if unknown else '(none)'!r} "
            f"(choose from {', '.join(MASK_KINDS)})"
        )
    hole_area = parse_hole_area(config.hole_area)
    if config.mixed_precision not in MIXED_PRECISION:
        raise InpaintError(
            f"--mixed-precision: {config.mixed_precision!r} is not one of "
            f"{', '.join(MIXED_PRECISION)}"
        )
    if config.background not in BACKGROUNDS:
        raise InpaintError(
            f"--background: {config.background!r} is not one of {', '.join(BACKGROUNDS)}"
        )
    for name in ("steps", "batch_size", "grad_accum", "val_every", "val_samples"):
        if getattr(config, name) < 1:
            raise InpaintError(f"--{name.replace('_', '-')}: must be at least 1")
    for name in ("checkpoint_every", "keep_last", "log_every", "skip_window"):
        if getattr(config, name) < 1:
            raise InpaintError(f"{name}: must be at least 1")
    if not 0.0 <= config.caption_dropout <= 1.0:
        raise InpaintError("--caption-dropout: must be between 0 and 1")
    if not (config.fill_loss >= 0 and math.isfinite(config.fill_loss)):
        raise InpaintError("--fill-loss: must be a number >= 0")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise InpaintError("--lr: must be a positive number")
    if config.warmup_steps < 0 or config.checkpoint_minutes < 0 or config.num_workers < 0:
        raise InpaintError("--warmup-steps, --checkpoint-minutes, --num-workers: must be >= 0")
    if config.patience < 0:
        raise InpaintError("--patience: must be >= 0")
    if config.patience and not config.val_data:
        raise InpaintError("--patience needs --val-data: it counts validations without a new best")
    if not 0.0 <= config.ema_decay < 1.0:
        raise InpaintError("ema_decay: must be in [0, 1)")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise InpaintError(f"{out}: exists and is not a folder")
    return kinds, hole_area


def parse_model_config(items: list[str]) -> dict[str, Any]:
    """`--model-config KEY=VALUE` items as a dict; a VALUE that is not JSON is taken as a string,
    so `norm=group` and `widths={"64": 48, ...}` both work."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InpaintError(f"--model-config: {item!r} is not KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parsed[key.strip()] = value
    return parsed


def _recorded_model_config(config: TrainConfig) -> Any:
    """On --resume, the architecture the run was started with (run.json), or None. A resumed
    --init run takes it from there: the --init folder may have moved or changed since (the
    bundled model changes with the package), and the checkpoint holds every weight anyway."""
    from model.hvae import HVAEConfig

    run_dir = Path(config.out)
    if not config.resume or not ckpt.list_checkpoints(run_dir):
        return None
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        return HVAEConfig.from_dict(record["model_config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no usable record: the --init folder decides, as when the run started


def _init_model_config(config: TrainConfig) -> Any:
    """The config of the --init model folder, for training: captions at full strength."""
    from model.hvae import CONFIG_NAME, HVAEConfig

    if config.model_config:
        raise InpaintError(
            "--model-config: the architecture of --init comes from its config.json; drop "
            "--model-config (a fine-tune keeps the architecture it starts from)"
        )
    recorded = _recorded_model_config(config)
    if recorded is not None:
        return recorded
    path = Path(config.init) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        model_config = HVAEConfig.from_dict(data)
    except FileNotFoundError:
        raise InpaintError(
            f"--init {config.init}: not a model folder (needs {CONFIG_NAME} and the weights)"
        ) from None
    except (OSError, ValueError, TypeError) as error:
        raise InpaintError(f"{path}: invalid model config: {error}") from None
    # a caption strength below 1 is an inference setting; training always sees whole captions
    model_config.caption_strength = 1.0
    return model_config


def _check_init_captions(config: TrainConfig, model_config: Any, text_encoder: Any) -> None:
    from conditioning import check_encoder_fits

    folder = config.init
    if text_encoder is None:
        if model_config.caption_dim:
            raise InpaintError(
                f"--init {folder}: the model has a caption path; train it with --captions"
            )
        return
    if not model_config.caption_dim:
        raise InpaintError(
            f"--init {folder}: the model has no caption path; train it with --no-captions"
        )
    try:
        check_encoder_fits(
            model_config.text_encoder, model_config.caption_dim, text_encoder.identity()
        )
    except ValueError as error:
        raise InpaintError(f"--init {folder}: {error}") from None


def _model_config(config: TrainConfig, text_encoder: Any) -> Any:
    from model.hvae import preset_config

    if config.init:
        model_config = _init_model_config(config)
        _check_init_captions(config, model_config, text_encoder)
        return model_config
    # the text path is decided by --captions and the encoder, not by --model-config
    reserved = sorted(
        {"caption_dim", "text_encoder", "condition_all_layers"} & set(config.model_config)
    )
    if reserved:
        raise InpaintError(
            f"--model-config: {reserved[0]} is set by --captions / --text-encoder / "
            "--condition-all-layers"
        )
    if "caption_strength" in config.model_config:
        # training always sees whole captions; the strength is tuned on validation afterwards
        raise InpaintError(
            "--model-config: caption_strength is an inference setting; choose it after training "
            "(inpaint eval --caption-strength) and set it with inpaint export --caption-strength"
        )
    overrides: dict[str, Any] = {**config.model_config, "caption_dim": 0, "text_encoder": None}
    recorded = _recorded_model_config(config) if text_encoder is not None else None
    if recorded is not None and recorded.caption_dim and recorded.text_encoder:
        from conditioning import check_same_encoder

        # another encoder of the same size loads the checkpoint without complaint, and the run
        # goes on learning from other embeddings under the first encoder's name
        try:
            check_same_encoder(recorded.text_encoder, text_encoder.identity())
        except ValueError as error:
            given = config.text_encoder or "the default text encoder"
            raise InpaintError(f"--resume with {given}: {error}") from None
    if text_encoder is not None:
        overrides.update(
            caption_dim=text_encoder.dim,
            text_encoder=text_encoder.identity(),
            condition_all_layers=config.condition_all_layers,
        )
    try:
        return preset_config(config.preset, **overrides)
    except (ValueError, TypeError) as error:
        option = "--model-config" if config.model_config else "--preset"
        raise InpaintError(f"{option}: {error}") from None


def _model_config_without_text(config: TrainConfig) -> Any:
    """The preset alone (cheap): fails early on an unknown preset and gives the resolution."""
    if config.init:
        return _init_model_config(config)
    return _model_config(config, None)


def _load_init_weights(config: TrainConfig, model: torch.nn.Module) -> None:
    """Copy the --init folder's weights into `model`, through the checks every model load
    passes (header against config before allocating, finite values; never a pickle)."""
    from model.hvae import HVAE

    try:
        source = HVAE.from_pretrained(config.init)
    except ValueError as error:
        raise InpaintError(f"--init {error}") from None
    model.load_state_dict(source.state_dict(), strict=True)


# Fields that decide which batches, masks and noise a step sees: a resume with other values
# continues the run, but is no longer the replay of the uninterrupted run.
_REPLAY_FIELDS = (
    "data",
    "seed",
    "batch_size",
    "grad_accum",
    "num_workers",
    "mask_kinds",
    "hole_area",
    "background",
    "preset",
    "model_config",
    "captions",
    "caption_dropout",
    "condition_all_layers",
    "fill_loss",
    "init",
    "steps",
    "lr",
    "warmup_steps",
)


def _warn_on_changes(
    accelerator: Any, resume_from: tuple[Path, dict[str, Any]], config: TrainConfig, world: int
) -> None:
    folder, saved = resume_from
    before = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    # a field newer than the checkpoint counts as its default
    defaults = {
        f.name: f.default_factory() if f.default_factory is not MISSING else f.default
        for f in fields(TrainConfig)
    }
    changed = [
        name for name in _REPLAY_FIELDS if before.get(name, defaults[name]) != getattr(config, name)
    ]
    if saved.get("world_size") != world:
        changed.append(f"processes ({saved.get('world_size')} -> {world})")
    if changed:
        accelerator.print(
            f"warning: resuming {folder} with changed {', '.join(changed)}: the run continues, "
            "but differs from an uninterrupted one"
        )
    if before.get("val_data") and not config.val_data:
        best = saved.get("best_step")
        accelerator.print(
            f"warning: resuming without --val-data (the run had {before['val_data']}): no "
            f"more validation, so best/ stays at step {best} and --patience cannot stop the run"
        )


def _load_text_encoder(config: TrainConfig, device: torch.device) -> Any:
    if not config.captions:
        return None  # --no-captions: a model without a text path; the encoder is never loaded
    from conditioning import TextEncoder

    try:
        return TextEncoder(config.text_encoder, device=device)
    except ValueError as error:  # TextEncoderError: the message starts with the path
        raise InpaintError(str(error)) from None


def _has_gpu() -> bool:
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    return any(
        (torch.cuda.is_available(), is_xpu_available(), is_npu_available(), is_mlu_available())
    )


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bf16 instructions (x86 AVX512-BF16 or AMX, Arm BF16), from the
    flags of /proc/cpuinfo; None where that cannot be told (no /proc, no flags line)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _rank_seed(seed: int, rank: int, purpose: int) -> int:
    return int(np.random.SeedSequence([seed, rank, purpose]).generate_state(1)[0])


def _seed_process(seed: int, rank: int) -> None:
    import random

    torch.manual_seed(_rank_seed(seed, rank, 1))
    np.random.seed(_rank_seed(seed, rank, 2))
    random.seed(_rank_seed(seed, rank, 3))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As nanoGPT: matrices and conv kernels decay; gains, biases and embeddings-as-vectors do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _git_commit() -> dict[str, Any] | None:
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in (
        "inpaint",
        "torch",
        "accelerate",
        "webdataset",
        "numpy",
        "safetensors",
        "transformers",
        "pillow",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _path_from_anywhere(path: str | None) -> str | None:
    """A local folder given on the command line, absolute (as given when it does not exist)."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _shards_from_anywhere(spec: str | None) -> str | None:
    """`spec` (--data, --val-data) with its local paths made absolute, for run.json: `inpaint
    report` reads the shards from whatever folder it runs in. `pipe:` commands and URLs are
    kept as given, and so is a spec whose absolute form would name other shards (a working
    folder whose name holds braces or '::'). Checkpoints keep the spec as given: a resume
    compares those with its command line."""
    import re

    from inpaint_cli.data import expand_urls, is_local_shard

    if not spec:
        return spec
    cwd = os.getcwd()

    def absolute(piece: str) -> str:
        piece = piece.strip()
        return os.path.join(cwd, piece) if piece and is_local_shard(piece) else piece

    def each_piece(part: str) -> str:
        if part.startswith("pipe:"):  # a command is one piece, commas and all
            return part
        return ",".join(map(absolute, re.split(r",(?![^{]*\})", part)))  # as expand_urls splits

    parts = [part.strip() for part in spec.split("::")]
    wanted = [absolute(url) for url in expand_urls(spec)]
    # a pattern or a folder name with a comma is taken whole, a list of patterns piece by piece
    for candidate in ("::".join(map(absolute, parts)), "::".join(map(each_piece, parts))):
        if expand_urls(candidate) == wanted:
            return candidate
    return spec


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    # Appended, not rewritten: a kill can cut the last line, which readers skip and a resume
    # drops (_truncate_log).
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        raise InpaintError(f"{path}: cannot write ({error.strerror or error})", 1) from None


def _truncate_log(path: Path, last_step: int) -> None:
    """After a resume, drop log lines past the checkpoint (and any line cut by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def _new_log_window() -> dict[str, Any]:
    return {"steps": 0, "count": 0, "sums": None, "seconds": 0.0, "grad_norm_max": 0.0}


def _params_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    # torch's DataLoader draws its workers' base seed from the global RNG when it starts (at the
    # first batch). Kept apart from the latents' noise stream, a resumed run (whose loader starts
    # mid-run) replays the uninterrupted one exactly.
    with torch.random.fork_rng(devices=[]):
        return next(batches)


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)


def stored_embeddings_usable(
    spec: str | None, text_encoder: Any, say: Callable[[str], None]
) -> bool:
    """Whether the caption embeddings stored in the shards of `spec` come from `text_encoder`
    (as far as their shards.json tells); if not, says once that captions are embedded again.
    Another encoder's embeddings of the same size would train silently on the wrong inputs,
    under this encoder's name."""
    from conditioning import check_same_encoder
    from inpaint_cli.data import expand_urls, shard_encoder_record

    if not spec or text_encoder is None:
        return True
    stored = shard_encoder_record(expand_urls(spec))
    if stored is None:
        return True
    try:
        check_same_encoder(text_encoder.identity(), stored)
    except ValueError:
        say(
            f"note: {spec}: the caption embeddings in these shards come from text encoder "
            f"'{stored.get('name')}', not the one training uses; captions are embedded again"
        )
        return False
    return True


def _caption_inputs(
    batch: dict[str, Any],
    text_encoder: Any,
    dropout: float,
    generator: torch.Generator,
    device: torch.device,
    use_stored: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if text_encoder is None:
        return None, None
    captions = list(batch["caption"])
    embedding = batch.get("caption_embedding") if use_stored else None
    if embedding is None:
        embedding = text_encoder.encode(captions)
    elif embedding.shape[-1] != text_encoder.dim:
        raise InpaintError(
            f"shards: caption embeddings have {embedding.shape[-1]} dimensions, the text encoder "
            f"{text_encoder.dim}; embed the shards with the same encoder or drop the embeddings"
        )
    keep = caption_keep(captions, dropout, generator)
    return embedding.to(device, torch.float32), keep.to(device)


# ---- validation ---------------------------------------------------------------------------------


def _check_val_data(config: TrainConfig, resolution: int) -> None:
    """Fail at once, not at the first validation (perhaps hours later), when --val-data holds
    no decodable image. Reads only up to the first image that decodes."""
    from inpaint_cli.data import eval_loader, expand_urls

    loader = eval_loader(expand_urls(config.val_data), resolution, 1, background=config.background)
    if next(iter(loader), None) is None:
        raise InpaintError(
            f"--val-data {config.val_data}: no decodable image (see the warnings)", exit_code=1
        )


@torch.no_grad()
def validate(
    accelerator: Any,
    ema: torch.nn.Module,
    config: TrainConfig,
    resolution: int,
    text_encoder: Any,
    val_kind: str,
    hole_area: tuple[float, float],
    use_stored: bool = True,
) -> dict[str, Any] | None:
    """EMA model on the first `val_samples` validation images, masks fixed per sample key.

    Every process reads the same images in the same batches and scores every world-th batch,
    each with posterior noise seeded by the batch's number: the figure does not depend on the
    number of processes (a run resumed on more or fewer keeps comparing like with like), and
    it uses a forked RNG, so it does not shift the training random stream. `fill_psnr_db` is
    the mean hole PSNR of the T=0 fill, the one `inpaint run` writes (before rounding to 8 bits).
    """
    from inpaint_cli.data import eval_loader, expand_urls

    world, rank = accelerator.num_processes, accelerator.process_index
    batch_size = min(config.batch_size, config.val_samples)
    loader = eval_loader(
        expand_urls(config.val_data),
        resolution,
        batch_size,
        seed=config.seed,
        num_workers=min(config.num_workers, 1),
        mask_kind=val_kind,
        hole_area=hole_area,
        background=config.background,
    )
    layers = ema.num_latent_layers
    sums = torch.zeros(4 + layers, dtype=torch.float64, device=accelerator.device)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    ema.eval()
    with torch.random.fork_rng(devices=devices):
        count = 0
        for number, batch in enumerate(loader):
            take = min(config.val_samples - count, len(batch["key"]))
            if take <= 0:
                break
            count += take
            if number % world != rank:
                continue
            torch.manual_seed(_rank_seed(config.seed, number, 5))
            batch = {key: value[:take] for key, value in batch.items()}
            image, mask = _to_device(batch, accelerator.device)
            # dropout 0: every real caption is used, empty ones take the learned empty caption
            embedding, keep = _caption_inputs(
                batch, text_encoder, 0.0, torch.Generator(), accelerator.device, use_stored
            )
            with accelerator.autocast():
                out = ema(image, mask, embedding, keep, score_fill=True)
            # pixels span 2 in [-1, 1]; an exact fill is capped as in `inpaint eval`
            psnr = (10 * torch.log10(4.0 / out["fill_mse"].double())).clamp_max(PSNR_CAP_DB)
            sums[0] += take
            sums[1] += out["per_image_bits_per_dim"].double().sum()
            sums[2] += out["recon_bits_per_dim"].double() * take
            sums[3] += psnr.sum()
            sums[4:] += out["kl_bits_per_dim"].double() * take
    sums = accelerator.reduce(sums, reduction="sum")
    total = int(sums[0].item())
    if total == 0:
        return None
    return {
        "samples": total,
        "nll_bits_per_dim": (sums[1] / total).item(),
        "recon_bits_per_dim": (sums[2] / total).item(),
        "fill_psnr_db": (sums[3] / total).item(),
        "kl_bits_per_dim": (sums[4:] / total).tolist(),
    }


# ---- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: Any,
    caption_generator: torch.Generator,
    keep_last: int,
) -> Path | None:
    """Every rank takes part (its RNG state is gathered); the main process writes and publishes."""
    row, layout = ckpt.pack_rng(ckpt.rng_parts(caption_generator))
    rows = accelerator.gather(row.to(accelerator.device).unsqueeze(0)).cpu()
    final = None
    if accelerator.is_main_process:
        temp = ckpt.begin(run_dir, state["step"])
        try:
            ckpt.write_tensors(
                temp, "model.safetensors", accelerator.unwrap_model(model).state_dict()
            )
            ckpt.write_tensors(temp, "ema.safetensors", ema.state_dict())
            tensors, meta = ckpt.optimizer_to_tensors(optimizer.state_dict())
            ckpt.write_tensors(temp, "optimizer.safetensors", tensors)
            ckpt.write_json(temp, "optimizer.json", meta)
            ckpt.write_tensors(temp, "rng.safetensors", {"rows": rows})
            ckpt.write_json(temp, "rng.json", {"layout": layout, "world_size": len(rows)})
            final = ckpt.finish(temp, state)
        except BaseException:
            import shutil

            shutil.rmtree(temp, ignore_errors=True)
            raise
        try:
            ckpt.prune(run_dir, keep_last)
        except OSError as error:
            raise InpaintError(f"{run_dir}: cannot remove old checkpoints ({error})", 1) from None
        ckpt.write_model_folder(ema, run_dir / "model")  # always the newest EMA weights
    accelerator.wait_for_everyone()
    return final


def _check_resumable(folder: Path, state: dict[str, Any]) -> None:
    """A checkpoint whose skip-rule history is not a list of finite numbers, or whose counters
    are not numbers, is passed over on resume, like one with a malformed step, rather than
    failing the resume halfway (or many steps later, at the first skipped update)."""
    rule = state.get("skip_rule")
    history = rule.get("history") if isinstance(rule, dict) else None
    try:
        usable = isinstance(history, list) and all(
            type(value) in (int, float) and math.isfinite(value) for value in history
        )
    except OverflowError:  # an integer too large for a float
        usable = False
    if not usable:
        raise InpaintError(f"{folder / ckpt.STATE_FILE}: malformed skip_rule", exit_code=1)
    # restored into the run's state (train()); absent ones keep their defaults
    kinds = {
        "skipped_nonfinite": (int,),
        "skipped_spike": (int,),
        "data_skipped_samples": (int,),
        "data_bad_shards": (int,),
        "images_seen": (int,),
        "train_seconds": (int, float),
        "best_val_nll": (float, type(None)),
        "best_step": (int, type(None)),
    }
    for key, allowed in kinds.items():
        if key in state and type(state[key]) not in allowed:
            raise InpaintError(f"{folder / ckpt.STATE_FILE}: malformed {key}", exit_code=1)


def load_checkpoint(
    folder: Path,
    accelerator: Any,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: Any,
    caption_generator: torch.Generator,
) -> None:
    from model.hvae import weights_mismatch

    network = accelerator.unwrap_model(model)
    for name, target in (("model.safetensors", network), ("ema.safetensors", ema)):
        tensors = ckpt.read_tensors(folder / name)
        # names and shapes compared first: load_state_dict's own error spans many lines
        shapes = {key: value.shape for key, value in tensors.items()}
        problem = weights_mismatch(network.config, shapes)
        if problem:
            raise InpaintError(
                f"{folder / name}: does not fit this model (other --preset, --model-config or "
                f"--captions?): {problem}"
            )
        target.load_state_dict(tensors)
    try:
        meta = ckpt.read_json(folder / "optimizer.json")
        tensors = ckpt.read_tensors(folder / "optimizer.safetensors")
        optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors, meta))
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise InpaintError(f"{folder}: unusable optimizer state ({first})", 1) from None
    rows = ckpt.read_tensors(folder / "rng.safetensors")["rows"]
    layout = ckpt.read_json(folder / "rng.json")["layout"]
    rank = accelerator.process_index
    if rank < len(rows):
        ckpt.restore_rng(ckpt.unpack_rng(rows[rank], layout), caption_generator)
    else:
        accelerator.print(
            f"warning: {folder} was written by {len(rows)} processes; rank {rank} starts a fresh "
            "random stream (the run continues, but not as an exact replay)"
        )


# ---- the run ------------------------------------------------------------------------------------


def train(config: TrainConfig, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Train (or resume) a run in `config.out`; returns a summary of what was done."""
    with ExitStack() as held:  # the run folder's lock, for as long as training runs
        return _train(config, hooks, held)


def _train(config: TrainConfig, hooks: TrainHooks | None, held: ExitStack) -> dict[str, Any]:
    import importlib.util

    from accelerate import Accelerator
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from inpaint_cli.data import expand_urls, train_loader

    hooks = hooks or TrainHooks()
    mask_kinds, hole_area = _validated(config)
    resolution = _model_config_without_text(config).resolution
    run_dir = Path(config.out)
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    # Under `accelerate launch --multi_gpu` or torchrun on a machine without GPUs, Accelerate
    # (1.x) sets up gloo multi-CPU training only when told cpu=True; otherwise every process
    # silently trains alone and they overwrite each other's run folder.
    processes = launched_processes()
    accelerator = Accelerator(
        cpu=processes > 1 and not _has_gpu(),
        mixed_precision=config.mixed_precision,
        log_with="tensorboard" if has_tensorboard else None,
        project_dir=str(run_dir),
    )
    if accelerator.num_processes != processes:
        raise InpaintError(
            f"launched as {processes} processes, but Accelerate set up "
            f"{accelerator.num_processes}: each process would train alone",
            exit_code=1,
        )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise InpaintError(
            "--mixed-precision fp16: needs a GPU; on the CPU Accelerate would silently train in "
            "fp32 (use bf16 or no)"
        )
    if config.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        if cpu_has_bf16() is False:
            # emulated bf16 was measured 4-6x slower than fp32 (README, Performance)
            accelerator.print(
                "warning: --mixed-precision bf16 on a CPU without bf16 instructions "
                "(AVX512-BF16, AMX or Arm BF16) runs several times slower than fp32; use "
                "--mixed-precision no here"
            )
    if config.warmup_steps >= config.steps:
        reached = learning_rate(config.steps - 1, config.lr, config.warmup_steps, config.steps)
        accelerator.print(
            f"warning: --warmup-steps {config.warmup_steps} is not below --steps {config.steps}: "
            f"the learning rate only reaches {reached:.3g}, not --lr {config.lr:g}; lower "
            "--warmup-steps for a short run"
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device

    # -- the run folder: refuse to overwrite a run unless asked to continue it
    if ckpt.list_checkpoints(run_dir) and not config.resume:
        raise InpaintError(
            f"{run_dir}: already holds checkpoints; pass --resume or use a new --out"
        )
    resume_from = ckpt.newest_complete(run_dir, _check_resumable) if config.resume else None
    if config.resume and resume_from is None:
        accelerator.print(f"{run_dir}: no complete checkpoint yet, starting from scratch")
    start_step = resume_from[1]["step"] if resume_from is not None else 0
    if start_step > config.steps:
        raise InpaintError(
            f"--steps {config.steps}: {run_dir} is already at step {start_step} (its newest "
            "checkpoint); --steps is the run's total, not the steps to add"
        )
    # read before anything changes: a resume appends to the run's record (command lines,
    # versions), which is not rewritten from scratch behind the user's back when damaged
    previous_record = None
    if resume_from is not None and (run_dir / "run.json").exists():
        try:
            previous_record = ckpt.read_run_record(run_dir)
        except InpaintError as error:
            raise InpaintError(
                f"{error}; fix it, or remove it to resume with a new one", 1
            ) from None

    # -- data: every rank reads its own shard stream; `start_batch` replays it exactly. Built
    # (and its shards checked) before the slow set-up below, so a typo fails at once.
    loader = train_loader(
        expand_urls(config.data),
        resolution,
        config.batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world,
        num_workers=config.num_workers,
        mask_kinds=tuple(mask_kinds),
        hole_area=hole_area,
        background=config.background,
        start_batch=start_step * config.grad_accum,
    )
    if config.val_data:
        _check_val_data(config, resolution)
    # -- model, EMA, text encoder: identical initial weights on every rank. Before the run
    # folder is made, so an --init or text encoder that is refused leaves no empty folder
    text_encoder = _load_text_encoder(config, device)
    model_config = _model_config(config, text_encoder)
    train_embeddings_usable = stored_embeddings_usable(config.data, text_encoder, accelerator.print)
    val_embeddings_usable = stored_embeddings_usable(
        config.val_data, text_encoder, accelerator.print
    )
    from model.hvae import HVAE

    torch.manual_seed(config.seed)
    model = HVAE(model_config)
    if config.init and resume_from is None:  # a resume takes every weight from its checkpoint
        _load_init_weights(config, model)

    accelerator.wait_for_everyone()  # every rank has read the folder before it changes
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InpaintError(f"{run_dir}: cannot create ({error.strerror})", 1) from None
        # one training per run folder: a second would take the first's checkpoints in the
        # making for leftovers of a kill, and both would write the same logs
        held.enter_context(output_lock(run_dir, "train"))
        ckpt.remove_unfinished(run_dir)

    ema = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    layers = model.num_latent_layers
    kl_warmup = config.kl_warmup_steps
    recorded_warmup = (previous_record or {}).get("kl_warmup_steps")
    if kl_warmup is None and isinstance(recorded_warmup, int) and recorded_warmup >= 0:
        # the run's own ramp: one recomputed from a new --steps would lower the KL weight of
        # layers already at 1 (and a latent at weight 0 learns to copy the hole)
        kl_warmup = recorded_warmup
    elif kl_warmup is None:
        # a trained model's latents already carry information: no KL warm-up when starting
        # from one (a zero KL weight would let the posterior drift from the prior again)
        kl_warmup = 0 if config.init else default_kl_warmup(config.steps, layers)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, config.adam_beta2)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    _seed_process(config.seed, rank)  # a different noise stream per rank for the latents
    caption_generator = torch.Generator().manual_seed(_rank_seed(config.seed, rank, 4))
    skip_rule = SkipRule(
        config.skip_factor,
        config.skip_window,
        config.skip_min_history,
        config.clip_factor,
        config.grad_clip,
    )

    images_per_step = config.batch_size * config.grad_accum * world
    state: dict[str, Any] = {
        "step": 0,
        "skipped_nonfinite": 0,
        "skipped_spike": 0,
        "val_nll": None,
        "best_val_nll": None,
        "best_step": None,
        "train_seconds": 0.0,
        "images_seen": 0,  # over all processes and sessions (the process count may change)
        "data_skipped_samples": 0,
        "data_bad_shards": 0,
    }
    if resume_from is not None:
        folder, saved = resume_from
        load_checkpoint(folder, accelerator, model, ema, optimizer, caption_generator)
        # after the load, which refuses another architecture: no "continues" before that error
        _warn_on_changes(accelerator, resume_from, config, world)
        skip_rule.load_state_dict(saved["skip_rule"])
        if saved.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        for key in state:
            state[key] = saved.get(key, state[key])
        if "images_seen" not in saved:  # a checkpoint from before the count was kept
            state["images_seen"] = start_step * images_per_step
        accelerator.print(f"resuming from {folder} (step {start_step})")

    # -- run.json, logs, trackers
    train_log, val_log = run_dir / "train.jsonl", run_dir / "val.jsonl"
    if main:
        run_record = {
            "command_line": config.command_line,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "git": _git_commit(),
            "world_size": world,
            "device": str(device),
            "config": dataclasses.asdict(config)
            | {key: _shards_from_anywhere(getattr(config, key)) for key in ("data", "val_data")}
            # `inpaint report` loads the encoder from whatever folder it runs in
            | {key: _path_from_anywhere(getattr(config, key)) for key in ("text_encoder", "init")}
            # with --init the folder's config.json decides these (model_config has them)
            | ({"preset": None, "condition_all_layers": None} if config.init else {}),
            "model_config": dataclasses.asdict(model_config),
            "kl_warmup_steps": kl_warmup,
            "resumes": [],
        }
        previous = run_dir / "run.json"
        if previous_record is not None:
            resumes = previous_record.get("resumes")
            # only a history: a damaged one is restarted rather than blocking the resume
            previous_record["resumes"] = (resumes if isinstance(resumes, list) else []) + [
                {key: run_record[key] for key in ("command_line", "started", "world_size")}
                | {"step": start_step, "config": run_record["config"], "kl_warmup_steps": kl_warmup}
            ]
            run_record = previous_record
        _write_json(previous, run_record)
        for log in (train_log, val_log):
            if resume_from is None:
                log.unlink(missing_ok=True)
            else:
                _truncate_log(log, start_step)
    if has_tensorboard:
        accelerator.init_trackers(
            "tensorboard",
            config={
                k: v
                for k, v in dataclasses.asdict(config).items()
                if isinstance(v, (int, float, str, bool))
            },
        )
    batches: Iterator[dict[str, Any]] = iter(loader)
    val_kind = "center" if "center" in mask_kinds else mask_kinds[0]
    seen_keys: list[str] = []
    samples_seen = 0
    # samples without any caption since the start; None once a caption was seen (or warned)
    uncaptioned = 0 if text_encoder is not None else None
    warned_upscaled = False  # one warning per run for images enlarged to the resolution

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} img/s"),
        TextColumn("skipped {task.fields[skipped]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not main,
    )
    task = progress.add_task(
        "train",
        total=config.steps,
        completed=start_step,
        loss="-",
        speed="-",
        skipped=state["skipped_nonfinite"] + state["skipped_spike"],
    )
    window = _new_log_window()
    session_seconds = 0.0
    last_checkpoint_time = time.monotonic()
    last_reduced: dict[str, Any] = {}
    stopped_early = interrupted = False
    model.train()
    stop = held.enter_context(StopRequest())
    with progress:
        for step in range(start_step, config.steps):
            step_start = time.perf_counter()
            lr = learning_rate(
                step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            kl_weights = torch.tensor(kl_warmup_weights(step, layers, kl_warmup), device=device)

            # -- forward/backward over the micro-batches; DDP syncs only on the last one
            sums = torch.zeros(3 + layers, dtype=torch.float64, device=device)
            for micro in range(config.grad_accum):
                batch = _next_batch(batches)
                keys = list(batch["key"])
                samples_seen += len(keys)
                if uncaptioned is not None:
                    uncaptioned = None if any(batch["caption"]) else uncaptioned + len(keys)
                    if uncaptioned is not None and uncaptioned >= CAPTION_CHECK_SAMPLES:
                        # an --init model keeps its caption path: no --no-captions hint
                        hint = "" if config.init else " (--no-captions trains without it)"
                        accelerator.print(
                            f"warning: no captions in the first {uncaptioned} samples of --data; "
                            f"the caption path learns only the empty caption{hint}"
                        )
                        uncaptioned = None
                if batch.get("upscaled") and not warned_upscaled:
                    warned_upscaled = True
                    accelerator.print(
                        f"warning: {len(batch['upscaled'])} of {len(keys)} images in a batch of "
                        f"--data are smaller than the model's {resolution} px and are enlarged "
                        f"to it (e.g. {batch['upscaled'][0]}); a model trained on enlarged "
                        "images learns to fill with blur: pack larger images"
                    )
                if len(seen_keys) < KEYS_RECORDED_PER_RANK:
                    seen_keys.extend(keys[: KEYS_RECORDED_PER_RANK - len(seen_keys)])
                image, mask = _to_device(batch, device)
                embedding, keep = _caption_inputs(
                    batch,
                    text_encoder,
                    config.caption_dropout,
                    caption_generator,
                    device,
                    train_embeddings_usable,
                )
                last = micro == config.grad_accum - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    out = model(
                        image, mask, embedding, keep, kl_weights, fill_weight=config.fill_loss
                    )
                    accelerator.backward(out["loss"] / config.grad_accum)
                sums[0] += out["loss"].detach().double()
                sums[1] += out["nll_bits_per_dim"].detach().double()
                sums[2] += out["recon_bits_per_dim"].detach().double()
                sums[3:] += out["kl_bits_per_dim"].detach().double()
            sums /= config.grad_accum
            if hooks.after_backward is not None:
                hooks.after_backward(step, accelerator.unwrap_model(model))
            clip_norm = skip_rule.clip_norm()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_norm)

            # -- decide on values every rank shares, so every rank skips together (a rank that
            # skipped alone would hang the next all-reduce)
            due = (  # 0 turns time-based checkpoints off (--checkpoint-every 1 saves each step)
                config.checkpoint_minutes > 0
                and time.monotonic() - last_checkpoint_time >= config.checkpoint_minutes * 60
            )
            asked_to_stop = float(stop.received is not None)
            extras = [
                float(due),
                loader.stats["skipped_samples"],
                loader.stats["bad_shards"],
                asked_to_stop,
            ]
            shared = torch.cat(
                [
                    sums,
                    grad_norm.detach().double().to(device).reshape(1),
                    torch.tensor(extras, dtype=torch.float64, device=device),
                ]
            )
            values = accelerator.reduce(shared, reduction="mean").tolist()
            loss, nll, recon, kl = values[0], values[1], values[2], values[3 : 3 + layers]
            reduced_norm, time_due = values[3 + layers], values[4 + layers] > 0
            interrupted = values[7 + layers] > 0  # any rank: all stop at this same step
            data_skipped = {  # totals over ranks, this session plus what earlier sessions saw
                "skipped_samples": state["data_skipped_samples"]
                + round(values[5 + layers] * world),
                "bad_shards": state["data_bad_shards"] + round(values[6 + layers] * world),
            }
            decision = skip_rule.check(loss, reduced_norm)
            if decision is None:
                optimizer.step()
                updates = step + 1 - state["skipped_nonfinite"] - state["skipped_spike"]
                update_ema(
                    ema, accelerator.unwrap_model(model), ema_decay_at(updates, config.ema_decay)
                )
            else:
                state[f"skipped_{decision}"] += 1
                if decision == "nonfinite" and accelerator.scaler is not None:
                    # fp16: GradScaler must see the overflow to lower its scale; its step()
                    # skips the update itself. Without this, fp16 would overflow forever.
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            state["images_seen"] += images_per_step
            step_seconds = time.perf_counter() - step_start
            state["train_seconds"] += step_seconds
            session_seconds += step_seconds

            # -- logs (main process), averaged over `log_every` steps
            skipped = state["skipped_nonfinite"] + state["skipped_spike"]
            if math.isfinite(loss):
                window["count"] += 1
                row = np.array([loss, nll, recon, *kl])
                window["sums"] = row if window["sums"] is None else window["sums"] + row
            window["seconds"] += step_seconds
            window["steps"] += 1
            if math.isfinite(reduced_norm):
                window["grad_norm_max"] = max(window["grad_norm_max"], reduced_norm)
            if state["step"] % config.log_every == 0 or state["step"] == config.steps:
                speed = images_per_step * window["steps"] / max(window["seconds"], 1e-9)
                means = (window["sums"] / window["count"]).tolist() if window["count"] else None
                record = {
                    "step": state["step"],
                    # fewer than log_every after a resume from a step between two log rows
                    "steps_averaged": window["steps"],
                    "loss": means[0] if means else None,
                    "nll_bits_per_dim": means[1] if means else None,
                    "recon_bits_per_dim": means[2] if means else None,
                    "kl_bits_per_dim": means[3:] if means else None,
                    "grad_norm": reduced_norm if math.isfinite(reduced_norm) else None,
                    "grad_norm_max": window["grad_norm_max"],
                    "skip_threshold": skip_rule.threshold(),
                    "clip_norm": clip_norm,
                    "skipped_updates": skipped,
                    "skipped_nonfinite": state["skipped_nonfinite"],
                    "skipped_spike": state["skipped_spike"],
                    "lr": lr,
                    "kl_weight_min": min(kl_warmup_weights(step, layers, kl_warmup)),
                    "images_per_second": speed,
                    "data_skipped_samples": data_skipped["skipped_samples"],
                    "data_bad_shards": data_skipped["bad_shards"],
                    "images_seen": state["images_seen"],
                }
                last_reduced = record
                if main:
                    _append_jsonl(train_log, record)
                    progress.update(
                        task,
                        loss=f"{record['loss']:.3f}" if means else "nan",
                        speed=f"{speed:.0f}",
                        skipped=skipped,
                    )
                if has_tensorboard:
                    accelerator.log(
                        {
                            "train/loss": record["loss"] or float("nan"),
                            "train/lr": lr,
                            "train/grad_norm": reduced_norm,
                            "train/skipped": skipped,
                            "train/images_per_second": speed,
                        }
                        | {f"train/kl_{i}": value for i, value in enumerate(kl)},
                        step=state["step"],
                    )
                window = _new_log_window()
            progress.update(task, completed=state["step"])

            # -- validation with the EMA weights; a new best is checkpointed and exported
            new_best = val_failed = False
            state["val_nll"] = None
            finished = state["step"] == config.steps
            if config.val_data and (state["step"] % config.val_every == 0 or finished):
                result = validate(
                    accelerator,
                    ema,
                    config,
                    model_config.resolution,
                    text_encoder,
                    val_kind,
                    hole_area,
                    val_embeddings_usable,
                )
                # no image decoded (every rank): checkpointed below, then training stops
                val_failed = result is None
                if result is not None:
                    state["val_nll"] = result["nll_bits_per_dim"]
                    best = state["best_val_nll"]
                    new_best = best is None or result["nll_bits_per_dim"] < best
                    if new_best:
                        state["best_val_nll"] = result["nll_bits_per_dim"]
                        state["best_step"] = state["step"]
                    if main:
                        _append_jsonl(val_log, {"step": state["step"], **result})
                        if new_best:
                            ckpt.write_model_folder(ema, run_dir / "best")
                    if has_tensorboard:
                        accelerator.log({"val/nll": result["nll_bits_per_dim"]}, step=state["step"])
                    # counted in steps since the best, so a resumed run counts the same way
                    since_best = state["step"] - state["best_step"]
                    patience_spent = since_best >= config.patience * config.val_every
                    stopped_early = bool(config.patience) and patience_spent and not finished

            # -- checkpoint every K steps, every `checkpoint_minutes`, at a new best, at the end
            checkpoint_due = state["step"] % config.checkpoint_every == 0 or time_due
            stopping = stopped_early or interrupted
            if checkpoint_due or new_best or finished or val_failed or stopping:
                full_state = {
                    **state,
                    "data_skipped_samples": data_skipped["skipped_samples"],
                    "data_bad_shards": data_skipped["bad_shards"],
                    "world_size": world,
                    "batches_per_rank": state["step"] * config.grad_accum,
                    "skip_rule": skip_rule.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                    "config": dataclasses.asdict(config),
                }
                save_checkpoint(
                    accelerator,
                    run_dir,
                    full_state,
                    model,
                    ema,
                    optimizer,
                    caption_generator,
                    config.keep_last,
                )
                last_checkpoint_time = time.monotonic()
            if val_failed:
                raise InpaintError(
                    f"--val-data {config.val_data}: no image could be decoded at the validation "
                    f"of step {state['step']} (see the warnings); that step is checkpointed: fix "
                    "--val-data and run again with --resume",
                    exit_code=1,
                )
            if hooks.after_step is not None:
                hooks.after_step(state["step"])
            if stopping:
                break

    # -- per-rank record: which samples this rank saw and a digest of its final weights
    rank_record = {
        "rank": rank,
        "world_size": world,
        "samples_seen_this_session": samples_seen,
        "first_keys": seen_keys,
        "params_sha256": _params_sha256(accelerator.unwrap_model(model)),
        "ema_sha256": _params_sha256(ema),
    }
    (run_dir / "ranks").mkdir(exist_ok=True)
    _write_json(run_dir / "ranks" / f"rank-{rank}.json", rank_record)
    if main:  # a session on fewer processes leaves no record of an earlier one's extra ranks
        for stale in (run_dir / "ranks").glob("rank-*.json"):
            number = stale.stem.removeprefix("rank-")
            if number.isdigit() and int(number) >= world:
                stale.unlink(missing_ok=True)
    if has_tensorboard:
        accelerator.end_training()
    if start_step == config.steps and main:
        ckpt.write_model_folder(ema, run_dir / "model")  # resumed a finished run: re-export only
    accelerator.wait_for_everyone()
    skipped = state["skipped_nonfinite"] + state["skipped_spike"]
    summary = {
        "out": str(run_dir),
        "steps": state["step"],
        "start_step": start_step,
        "world_size": world,
        "skipped_updates": skipped,
        "skipped_nonfinite": state["skipped_nonfinite"],
        "skipped_spike": state["skipped_spike"],
        "final_loss": last_reduced.get("loss"),
        "final_nll_bits_per_dim": last_reduced.get("nll_bits_per_dim"),
        "best_val_nll": state["best_val_nll"],
        "best_step": state["best_step"],
        "stopped_early": stopped_early,
        "images_per_second": (state["step"] - start_step) * images_per_step / session_seconds
        if session_seconds > 0
        else None,
        "model": str(run_dir / "model"),
    }
    if main:
        accelerator.print(
            f"trained {state['step'] - start_step} steps to step {state['step']} "
            + (
                f"(stopped early: no new best validation NLL for {config.patience} validations) "
                if stopped_early
                else ""
            )
            + f"({skipped} updates skipped); EMA model in {run_dir / 'model'}"
            + (
                f", best (val NLL {state['best_val_nll']:.4f} bits/dim at step "
                f"{state['best_step']}) in {run_dir / 'best'}"
                if state["best_val_nll"]
                else ""
            )
        )
    if world > 1:
        # gloo's threads must stop before the interpreter does, or a rank can abort at exit
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    if interrupted and state["step"] < config.steps:
        name = signal.Signals(stop.received).name if stop.received else "a signal on another rank"
        raise InpaintError(
            f"{run_dir}: stopped by {name} at step {state['step']}, which is checkpointed; "
            "run the same command with --resume to go on",
            exit_code=128 + (stop.received or signal.SIGTERM),
            every_rank=True,  # every process stops at this step
        )
    return summary
