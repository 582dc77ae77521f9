"""Training checkpoints: folders of safetensors + JSON, never pickles.

A checkpoint is written into `checkpoints/.tmp-step-N`, its `state.json` last, and only then renamed
to `checkpoints/step-N`. A rename is atomic, so a folder named `step-N` is complete by construction
and a kill at any moment leaves either the previous checkpoints or a `.tmp-` folder that the next
`--resume` removes. Old checkpoints are renamed to `.del-` before they are deleted for the same
reason. Loading verifies every file's size against `state.json` before anything is used, and a
resume first checks that the saved random states can be restored (check_rng).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from inpaint_cli.errors import InpaintError
from inpaint_cli.images import atomic_write_bytes

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
FORMAT = "inpaint-checkpoint/1"
_NAME_RE = re.compile(r"^step-(\d{8})$")
_TEMP_PREFIX = ".tmp-"
_DELETE_PREFIX = ".del-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints (those with a state.json) as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _NAME_RE.match(folder.name)
        if match and (folder / STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def remove_unfinished(run_dir: Path) -> list[Path]:
    """Delete `.tmp-` folders (a write that was killed) and `.del-` ones (a killed deletion)."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith((_TEMP_PREFIX, _DELETE_PREFIX)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def begin(run_dir: Path, step: int) -> Path:
    """Create an empty temporary folder for the checkpoint of `step` (main process only)."""
    root = Path(run_dir) / CHECKPOINTS
    temp = root / f"{_TEMP_PREFIX}{checkpoint_name(step)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
    except OSError as error:
        raise InpaintError(
            f"{temp}: cannot create ({error.strerror or error})", exit_code=1
        ) from None
    return temp


def write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    # Copies to the CPU so tied/shared parameters become separate tensors (safetensors refuses
    # aliased storage) and the bytes cannot change while they are written.
    plain = {
        key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()
    }
    atomic_write_bytes(folder / name, save_safetensors(plain))


def write_json(folder: Path, name: str, payload: Any) -> None:
    atomic_write_bytes(folder / name, json.dumps(payload, indent=1, allow_nan=True).encode())


def publish(temp: Path, final: Path) -> None:
    """The commit point: an atomic rename of the finished temporary folder."""
    os.replace(temp, final)
    _fsync_dir(final.parent)


def finish(temp: Path, state: dict[str, Any]) -> Path:
    """Write state.json (with every file's size) last, then publish the folder under its name."""
    files = {path.name: path.stat().st_size for path in sorted(temp.iterdir()) if path.is_file()}
    write_json(temp, STATE_FILE, {**state, "format": FORMAT, "files": files})
    _fsync_dir(temp)
    final = temp.with_name(checkpoint_name(int(state["step"])))
    if final.exists():  # a checkpoint of the same step from before a resume: same content
        retire(final)
    try:
        publish(temp, final)
    except OSError as error:
        raise InpaintError(f"{final}: cannot publish ({error.strerror or error})", 1) from None
    return final


def retire(folder: Path) -> None:
    """Delete a checkpoint folder without ever leaving a partial `step-N` behind."""
    doomed = folder.with_name(f"{_DELETE_PREFIX}{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints and the one with the lowest validation
    NLL. A damaged checkpoint is neither counted nor deleted: it is left for the user to inspect
    (a resumed run replaces it when it reaches that step again)."""
    complete = complete_checkpoints(run_dir)
    keep = {folder for _, folder, _ in complete[-keep_last:]}
    best = _lowest_val_nll(complete)
    if best is not None:
        keep.add(best)
    removed = []
    for _, folder, _ in complete:
        if folder not in keep:
            retire(folder)
            removed.append(folder)
    return removed


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest finite validation NLL, if any was validated."""
    return _lowest_val_nll(complete_checkpoints(run_dir))


def _lowest_val_nll(complete: list[tuple[int, Path, dict[str, Any]]]) -> Path | None:
    scored = []
    for step, folder, state in complete:
        value = state.get("val_nll")
        # training writes a float (JSON keeps it one); a bool or a huge integer is not a score
        if type(value) is float and math.isfinite(value):
            scored.append((value, step, folder))
    return min(scored)[2] if scored else None


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """(step, folder, state) of every checkpoint that verifies, oldest first; damaged ones are
    named in a warning and passed over, so one bad folder never blocks a scan."""
    found = []
    for step, folder in list_checkpoints(run_dir):
        try:
            found.append((step, folder, verify(folder)))
        except InpaintError as error:
            _warn_skipped(error)
    return found


def _warn_skipped(error: InpaintError) -> None:
    # Every checkpoint save scans the folder again: name each damaged checkpoint once only.
    message = f"warning: skipping checkpoint {error}"
    if message not in _WARNED:
        _WARNED.add(message)
        print(message)


_WARNED: set[str] = set()


def export_model(
    run_dir: Path, out: Path, step: int | None = None, caption_strength: float | None = None
) -> Path:
    """Write the EMA weights of one checkpoint as the model folder `inpaint run --model` reads
    (config.json + model.safetensors); returns the checkpoint used.

    `step` None takes the best checkpoint by validation NLL, or the newest when none was
    validated. A run's own `best/` and `model/` hold only those two, so this is how any other
    step (say, one chosen on a different measure) becomes usable. `caption_strength` (chosen on
    validation with `inpaint eval --caption-strength`) is recorded in the folder's config.
    """
    from model.hvae import HVAE, HVAEConfig, weights_mismatch

    run_dir, out = Path(run_dir), Path(out)
    checkpoints = dict(list_checkpoints(run_dir))
    if not checkpoints:
        raise InpaintError(f"{run_dir}: no checkpoints (not an `inpaint train` run folder?)")
    if step is None:
        complete = complete_checkpoints(run_dir)  # verified; damaged ones passed over, warned
        if not complete:
            raise InpaintError(f"{run_dir}: no complete checkpoint (see the warnings)", 1)
        folder = _lowest_val_nll(complete) or complete[-1][1]
    elif step in checkpoints:
        folder = checkpoints[step]
        verify(folder)
    else:
        have = ", ".join(str(s) for s in sorted(checkpoints))
        raise InpaintError(f"{run_dir}: no checkpoint at step {step} (there are: {have})")
    _check_export_target(run_dir, out)
    run = read_run_record(run_dir)
    try:
        config = dict(run["model_config"])
        if caption_strength is not None:
            if not config.get("caption_dim"):
                raise InpaintError(
                    f"{run_dir}: --caption-strength needs a model trained with captions", 2
                )
            config["caption_strength"] = caption_strength
        config = HVAEConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as error:
        raise InpaintError(f"{run_dir / 'run.json'}: no usable model config ({error})", 1) from None
    tensors = read_tensors(folder / "ema.safetensors")
    # compared before the model is built: run.json alone could describe a model of terabytes
    problem = weights_mismatch(config, {name: value.shape for name, value in tensors.items()})
    if problem:
        raise InpaintError(f"{folder}: weights do not fit the run's model config: {problem}", 1)
    model = HVAE(config)
    model.load_state_dict(tensors)
    write_model_folder(model, out)
    return folder


def _check_export_target(run_dir: Path, out: Path) -> None:
    """Refuse an export folder whose files the export would destroy: a checkpoint (`--resume`
    would go on from the exported weights) or anything in the run's checkpoints folder, the
    `best/` or `model/` folder of any training run, a file, or a folder of other files. A new
    or empty folder, or a model folder of this project (re-export), is fine."""
    if out.resolve().is_relative_to((run_dir / CHECKPOINTS).resolve()):
        raise InpaintError(f"{out}: inside the run's checkpoints folder; choose another --out")
    _refuse_run_model_folder(run_dir, out)
    if (out / STATE_FILE).exists():
        raise InpaintError(
            f"{out}: a training checkpoint, not a model folder; choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise InpaintError(f"{out}: not a folder")
    try:
        foreign = out.is_dir() and any(out.iterdir())
    except OSError as error:
        raise InpaintError(f"{out}: cannot read ({error.strerror or error})", 1) from None
    if foreign:
        _refuse_unless_model_folder(out)


# The folders `inpaint train` writes its newest and its best EMA weights to, beside run.json.
RUN_MODEL_FOLDERS = ("best", "model")


def _refuse_run_model_folder(run_dir: Path, out: Path) -> None:
    # Training rewrites these; another step there would pass for that run's best or newest.
    target = out.resolve()
    if target.name not in RUN_MODEL_FOLDERS:
        return
    if target.parent == run_dir.resolve():
        raise InpaintError(f"{out}: the run's own {target.name}/ folder; choose another --out")
    if (target.parent / "run.json").is_file():
        raise InpaintError(
            f"{out}: the {target.name}/ folder of the training run {target.parent}; "
            "choose another --out"
        )


def _refuse_unless_model_folder(out: Path) -> None:
    """Refuse a folder with files unless its config.json is a model config of this project:
    any other config.json (a Hugging Face model, say) belongs to files the export would
    replace. Only the config is read: nothing is built."""
    from model.hvae import CONFIG_NAME, HVAEConfig

    config_path = out / CONFIG_NAME
    if not config_path.is_file():
        raise InpaintError(
            f"{out}: holds files but is not a model folder (no {CONFIG_NAME}); "
            "choose a new or empty folder"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        HVAEConfig.from_dict(config)
    except OSError as error:
        raise InpaintError(f"{config_path}: cannot read ({error.strerror or error})", 1) from None
    except (UnicodeDecodeError, TypeError, ValueError) as error:
        raise InpaintError(
            f"{out}: holds files but is not a model folder of inpaint ({CONFIG_NAME}: {error}); "
            "choose a new or empty folder"
        ) from None


def write_model_folder(model: torch.nn.Module, folder: Path) -> None:
    """The plain model folder `inpaint run --model` reads (each file replaced atomically)."""
    try:
        model.save_pretrained(folder)
    except OSError as error:
        raise InpaintError(f"{folder}: cannot write ({error.strerror or error})", 1) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InpaintError(f"{path}: unreadable ({error})", exit_code=1) from None


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """The run's run.json (written by `inpaint train`), which must be a JSON object."""
    path = Path(run_dir) / "run.json"
    run = read_json(path)
    if not isinstance(run, dict):
        raise InpaintError(f"{path}: not a run record of `inpaint train`", exit_code=1)
    return run


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(Path(path).read_bytes())
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise InpaintError(f"{path}: not a readable safetensors file ({error})", 1) from None


def verify(folder: Path) -> dict[str, Any]:
    """The checkpoint's state.json, after checking that every listed file has its recorded size."""
    state = read_json(folder / STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InpaintError(f"{folder}: not an inpaint checkpoint", exit_code=1)
    files = state.get("files")
    if not isinstance(files, dict) or not isinstance(state.get("step"), int):
        raise InpaintError(f"{folder / STATE_FILE}: malformed", exit_code=1)
    for name, size in files.items():
        path = folder / str(name)
        if Path(name).name != name or not path.is_file() or path.stat().st_size != size:
            raise InpaintError(f"{path}: missing or of the wrong size", exit_code=1)
    return state


def newest_complete(
    run_dir: Path, check: Callable[[Path, dict[str, Any]], None] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint to resume from: one that verifies, whose RNG states can be
    restored (check_rng) and that passes `check` (which raises InpaintError), skipping (and
    naming) damaged ones."""
    for _, folder in reversed(list_checkpoints(run_dir)):
        try:
            state = verify(folder)
            check_rng(folder)
            if check is not None:
                check(folder, state)
            return folder, state
        except InpaintError as error:
            _warn_skipped(error)
    return None


def optimizer_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-ready tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            key = f"{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# RNG states of one process, packed into one byte row of fixed layout so that the main process
# can gather every rank's row in one collective and write them into one safetensors file.


def rng_parts(caption_generator: torch.Generator) -> dict[str, torch.Tensor]:
    import random

    version, mt_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    parts = {
        "torch": torch.get_rng_state(),
        "captions": caption_generator.get_state(),
        "python_state": torch.tensor(mt_state, dtype=torch.int64),
        "python_extra": torch.tensor(
            [version, gauss_next is not None, gauss_next or 0.0], dtype=torch.float64
        ),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        parts["cuda"] = torch.cuda.get_rng_state()
    return parts


def pack_rng(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    layout = []
    chunks = []
    for name, tensor in parts.items():
        tensor = tensor.detach().cpu().contiguous()
        raw = tensor.view(-1).view(torch.uint8)
        layout.append({"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)})
        chunks.append(raw)
    return torch.cat(chunks), layout


def unpack_rng(row: torch.Tensor, layout: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The parts pack_rng packed into `row`; ValueError when `layout` does not describe it."""
    parts = {}
    offset = 0
    for entry in layout:
        dtype = getattr(torch, str(entry["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {entry['dtype']!r}")
        shape = [int(size) for size in entry["shape"]]
        count = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if count < 0 or offset + count > len(row):
            raise ValueError(f"the layout describes more than the row's {len(row)} bytes")
        parts[entry["name"]] = row[offset : offset + count].clone().view(dtype).view(shape)
        offset += count
    if offset != len(row):
        raise ValueError(f"the layout describes {offset} bytes, the row holds {len(row)}")
    return parts


def restore_rng(parts: dict[str, torch.Tensor], caption_generator: torch.Generator) -> None:
    import random

    _set_rng(parts, torch.default_generator, caption_generator, random, np.random)
    if "cuda" in parts and torch.cuda.is_available():
        torch.cuda.set_rng_state(parts["cuda"])


def _set_rng(
    parts: dict[str, torch.Tensor],
    torch_generator: torch.Generator,
    caption_generator: torch.Generator,
    python_random: Any,
    numpy_random: Any,
) -> None:
    torch_generator.set_state(parts["torch"])
    caption_generator.set_state(parts["captions"])
    version, has_gauss, gauss = parts["python_extra"].tolist()
    mt_state = tuple(int(value) for value in parts["python_state"].tolist())
    python_random.setstate((int(version), mt_state, gauss if has_gauss else None))
    pos, has_gauss, cached = parts["numpy_extra"].tolist()
    keys = parts["numpy_keys"].numpy().astype(np.uint32)
    numpy_random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))


def check_rng(folder: Path) -> None:
    """Raise a one-line InpaintError naming the file unless every process's RNG state in the
    checkpoint `folder` can be restored. verify checks sizes only: a bit flip or an edit that
    keeps the size would otherwise fail a resume, after the model is loaded, with a traceback.
    Each state is tried on throwaway generators, so nothing global changes."""
    import random

    layout_path, rows_path = folder / "rng.json", folder / "rng.safetensors"
    record = read_json(layout_path)
    layout = record.get("layout") if isinstance(record, dict) else None
    if not isinstance(layout, list):
        raise InpaintError(f"{layout_path}: no RNG layout", exit_code=1)
    rows = read_tensors(rows_path).get("rows")
    if rows is None or rows.dtype != torch.uint8 or rows.dim() != 2:
        raise InpaintError(f"{rows_path}: no rows of RNG state", exit_code=1)
    for row in rows:
        try:
            parts = unpack_rng(row, layout)
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
            raise InpaintError(f"{layout_path}: malformed RNG layout ({error})", 1) from None
        try:
            trial = (torch.Generator(), torch.Generator(), random.Random())
            _set_rng(parts, *trial, np.random.RandomState())
        except KeyError as error:
            raise InpaintError(f"{layout_path}: malformed RNG layout (no {error})", 1) from None
        except (TypeError, ValueError, OverflowError, RuntimeError) as error:
            raise InpaintError(f"{rows_path}: not a valid RNG state ({error})", 1) from None


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable across a power loss; a killed process needs no fsync.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
