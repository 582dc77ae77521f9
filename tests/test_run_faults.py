"""`inpaint run` under bad input and injected faults (issue 8), and under `accelerate launch`.

Each bad-input case checks: the exit code, one stderr line naming the file and the problem, no
traceback, and the rest of the batch done.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_run import (
    _box_mask,
    _noise_image,
    _pngs,
    _save_mask,
    assert_outside_unchanged,
    decoded,
    invoke,
    make_mixed_folder,
    make_tiny_model,
)

import inpaint_cli.images as images_module
from inpaint_cli.run import RunOptions, run_folder

HOLE = [(0.25, 0.25, 0.6, 0.6)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory)


def _png_bytes(img: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def _bad_file(kind: str) -> tuple[str, bytes]:
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(_noise_image(rng, 40, 30))
    if kind == "zero_bytes":
        return "zero.png", b""
    if kind == "truncated_png":
        return "cut.png", _png_bytes(rgb)[:200]
    if kind == "truncated_jpeg":
        return "cut.jpg", _png_bytes(rgb, format="JPEG", quality=95)[:400]
    if kind == "text_as_jpeg":
        return "notes.jpg", b"just some text, not an image\n"
    raise ValueError(kind)


def _folder_with(tmp_path: Path, name: str, data: bytes) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    rng = np.random.default_rng(6)
    Image.fromarray(_noise_image(rng, 24, 24)).save(images / "good.png")
    _save_mask(masks / "good.png", _box_mask(24, 24, HOLE))
    (images / name).write_bytes(data)
    _save_mask(masks / (Path(name).stem + ".png"), _box_mask(40, 30, HOLE))
    return images, masks


def _run_cli(images: Path, masks: Path, out: Path, model: Path, *extra: str):
    return invoke(images, "--masks", masks, "--out", out, "--model", model,
                  "--num-workers", "0", *extra)  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("zero_bytes", "0 bytes"),
        ("truncated_png", "truncated"),
        ("truncated_jpeg", "truncated"),
        ("text_as_jpeg", "not a supported image"),
    ],
)
def test_unreadable_image_fails_alone(kind, problem, tmp_path, tiny_model):
    name, data = _bad_file(kind)
    images, masks = _folder_with(tmp_path, name, data)
    out = tmp_path / "out"
    result = _run_cli(images, masks, out, tiny_model)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if name in line]
    assert len(lines) == 1 and problem in lines[0], result.stderr
    assert (out / "good.png").is_file() and not (out / (Path(name).stem + ".png")).exists()
    failures = (out / "failures.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in failures] == [name]


def test_pillow_warn_only_bomb_is_refused(tmp_path, tiny_model, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; the run must refuse it.
    images, masks = _folder_with(tmp_path, "bomb.png", _png_bytes(Image.new("RGB", (40, 30))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x30 = 1200: the warn-only range
    result = _run_cli(images, masks, tmp_path / "out", tiny_model)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "bomb.png" in line]
    assert len(lines) == 1 and "decompression bomb" in lines[0]
    assert (tmp_path / "out" / "good.png").is_file()


def _odd_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    sixteen = Image.fromarray((rng.integers(0, 65536, (30, 40))).astype(np.uint16))
    cmyk = Image.fromarray(_noise_image(rng, 40, 30)).convert("CMYK")
    palette = Image.fromarray(_noise_image(rng, 40, 30)).quantize(16)
    palette.info["transparency"] = 3
    return {
        "one.png": Image.new("RGB", (1, 1), (10, 200, 30)),
        "sixteen.png": sixteen,
        "cmyk.jpg": cmyk,
        "palette.png": palette,
        "café au lait ✓.png": Image.fromarray(_noise_image(rng, 40, 30)),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_odd_but_valid_images_are_filled(name, tmp_path, tiny_model):
    img = _odd_images()[name]
    data = _png_bytes(img, format="JPEG" if name.endswith(".jpg") else "PNG",
                      **({"transparency": 3} if name == "palette.png" else {}))  # fmt: skip
    images, masks = _folder_with(tmp_path, name, data)
    if name == "one.png":
        _save_mask(masks / "one.png", np.full((1, 1), 255, np.uint8))
    out = tmp_path / "out"
    result = _run_cli(images, masks, out, tiny_model, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == 2
    output = out / (Path(name).stem + ".png")
    hole = np.asarray(Image.open(masks / output.name).convert("L")) >= 128
    assert_outside_unchanged(images / name, output, hole)
    written = Image.open(output)
    expected = {"sixteen.png": "I;16", "cmyk.jpg": "RGB", "palette.png": "RGBA"}
    assert written.mode == expected.get(name, "RGB")
    if name == "sixteen.png":
        filled = np.asarray(written)[hole]
        assert (filled % 257 == 0).all()  # 8-bit fill scaled to 16 bits, not clipped
        assert filled.max() > 255
    if name == "palette.png":
        alpha_in = np.asarray(decoded(images / name).convert("RGBA"))[:, :, 3]
        assert np.array_equal(np.asarray(written)[:, :, 3], alpha_in)
        assert (alpha_in == 0).any()


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_colour_is_filled_at_8_bits_with_one_warning(channels, tmp_path, tiny_model):
    import cv2

    rng = np.random.default_rng(9)
    deep = rng.integers(0, 65536, (30, 40, channels)).astype(np.uint16)
    ok, data = cv2.imencode(".png", deep[..., [2, 1, 0, 3][:channels]])  # OpenCV writes BGR(A)
    images, masks = _folder_with(tmp_path, "deep.png", data.tobytes())
    out = tmp_path / "out"
    result = _run_cli(images, masks, out, tiny_model)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "deep.png" in line]
    assert warnings == [
        f"warning: {images / 'deep.png'}: 16 bits per channel, read and written at 8 "
        "(only 16-bit grey stays 16-bit)"
    ]
    written = Image.open(out / "deep.png")
    assert written.mode == ("RGB", "RGBA")[channels - 3]
    hole = np.asarray(Image.open(masks / "deep.png").convert("L")) >= 128
    # outside the hole: the high byte of each 16-bit value (scaled, not clipped at 255)
    assert np.array_equal(np.asarray(written)[~hole], (deep >> 8)[~hole])


def _one_image_with_mask(tmp_path: Path, mask: np.ndarray) -> tuple[Path, Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    rng = np.random.default_rng(8)
    Image.fromarray(_noise_image(rng, mask.shape[1], mask.shape[0])).save(images / "pic.png")
    masks.mkdir()
    Image.fromarray(mask).save(masks / "pic.png")
    return images, masks, tmp_path / "out"


def _changed(images: Path, out: Path) -> np.ndarray:
    before = np.asarray(decoded(images / "pic.png"), np.int32)
    after = np.asarray(Image.open(out / "pic.png"), np.int32)
    return np.any(before != after, axis=2)


def test_all_black_mask_copies_the_image_and_says_so(tmp_path, tiny_model):
    images, masks, out = _one_image_with_mask(tmp_path, np.zeros((20, 30), np.uint8))
    result = _run_cli(images, masks, out, tiny_model, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["copied"] == 1
    notes = [line for line in result.stderr.splitlines() if "pic.png" in line]
    assert len(notes) == 1 and "mask is empty" in notes[0]
    assert not _changed(images, out).any()


def test_all_white_mask_generates_the_whole_image(tmp_path, tiny_model):
    images, masks, out = _one_image_with_mask(tmp_path, np.full((20, 30), 255, np.uint8))
    result = _run_cli(images, masks, out, tiny_model)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "pic.png").size == (30, 20)
    assert _changed(images, out).mean() > 0.9


def test_huge_dilate_fills_the_whole_image(tmp_path, tiny_model):
    mask = np.zeros((20, 30), np.uint8)
    mask[2:4, 2:4] = 255
    images, masks, out = _one_image_with_mask(tmp_path, mask)
    result = _run_cli(images, masks, out, tiny_model, "--dilate", "100000")
    assert result.exit_code == 0, result.output
    assert _changed(images, out).mean() > 0.9  # grown past the image: all of it is the hole


def test_grey_level_and_rgb_masks_use_the_128_threshold(tmp_path, tiny_model):
    mask = np.zeros((24, 36, 3), np.uint8)
    mask[2:10, 2:10] = (100, 100, 100)  # grey below 128: kept
    mask[14:22, 2:10] = (200, 200, 200)  # grey above 128: hole
    mask[2:10, 20:30] = (255, 0, 0)  # pure red is dark in greyscale (76): kept
    mask[14:22, 20:30] = (255, 255, 255)  # white: hole
    images, masks, out = _one_image_with_mask(tmp_path, mask)
    assert _run_cli(images, masks, out, tiny_model).exit_code == 0
    changed = _changed(images, out)
    expected_hole = mask.mean(axis=2) >= 128
    assert not changed[~expected_hole].any()
    assert changed[14:22, 2:10].any() and changed[14:22, 20:30].any()


# ----------------------------------------------------------------------------- faults


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from inpaint_cli.run import RunOptions, run_folder

    real_replace, calls = os.replace, [0]

    def replace_then_die(src, dst):
        # the moment between the complete temporary file and its rename
        if str(dst).endswith(".png"):
            calls[0] += 1
            if calls[0] == int(sys.argv[5]):
                os._exit(137)
        return real_replace(src, dst)

    if int(sys.argv[5]) > 0:
        os.replace = replace_then_die
    run_folder(RunOptions(images=Path(sys.argv[1]), masks=Path(sys.argv[2]),
                          out=Path(sys.argv[3]), model=Path(sys.argv[4]), samples=2,
                          num_workers=0, batch_size=3))
    """
)


def _kill_run(tmp_path: Path, folder: dict, out: Path, model: Path, die_at: int):
    script = tmp_path / "kill_run.py"
    script.write_text(KILL_SCRIPT)
    args = [folder["images"], folder["masks"], out, model, die_at]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip


def test_kill_between_temp_write_and_rename(tmp_path, tiny_model):
    folder = make_mixed_folder(tmp_path)
    out = tmp_path / "out"
    killed = _kill_run(tmp_path, folder, out, tiny_model, die_at=3)
    assert killed.returncode == 137, killed.stderr
    temps = [p for p in out.rglob(".*.tmp")]
    assert len(temps) == 1  # the kill landed after the temp file was complete
    visible = [p for p in out.rglob("*.png") if not p.name.startswith(".")]
    assert len(visible) == 2  # the first image's two samples, nothing half-written
    for path in visible:
        Image.open(path).load()  # every visible output is complete
    resumed = _kill_run(tmp_path, folder, out, tiny_model, die_at=0)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob(".*.tmp"))
    clean = tmp_path / "clean"
    run_folder(RunOptions(images=folder["images"], masks=folder["masks"], out=clean,
                          model=tiny_model, samples=2, num_workers=0, batch_size=3))  # fmt: skip
    assert _pngs(out) == _pngs(clean)


class _OsWithFailingWrites:
    """images.py's view of `os`, where writes start failing after a few (disk full, RO)."""

    def __init__(self, code: int, succeed: int) -> None:
        self.code, self.left = code, succeed

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        if self.left <= 0:
            raise OSError(self.code, os.strerror(self.code))
        self.left -= 1
        return os.write(fd, data)


def test_grid_that_cannot_be_written_still_prints_the_summary(tmp_path, tiny_model, monkeypatch):
    import inpaint_cli.run_plan as run_plan

    images, masks, out = _one_image_with_mask(tmp_path, _box_mask(30, 20, HOLE))
    (tmp_path / "afile").write_text("a file where the grid's folder should be")
    grid = tmp_path / "afile" / "grid.png"
    refused = _run_cli(images, masks, out, tiny_model, "--grid", grid)
    assert refused.exit_code == 2 and not out.exists()  # refused before any work
    assert refused.stderr.strip().splitlines() == [
        f"error: {grid}: cannot make its folder, {tmp_path / 'afile'} is a file"
    ]
    # a grid folder that fails only at the end (e.g. made read-only meanwhile)
    monkeypatch.setattr(run_plan, "check_grid_folder", lambda grid: None)
    late = _run_cli(images, masks, out, tiny_model, "--grid", grid, "--json")
    assert late.exit_code == 1 and "Traceback" not in late.output
    assert json.loads(late.stdout)["done"] == 1 and (out / "pic.png").is_file()
    (line,) = late.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'afile'}: cannot create folder") and "grid" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("succeed", [0, 2])  # at the manifest, or mid-image
def test_disk_full_or_read_only_stops_cleanly(code, succeed, tmp_path, tiny_model, monkeypatch):
    folder = make_mixed_folder(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(images_module, "os", _OsWithFailingWrites(code, succeed))
    result = invoke(folder["images"], "--masks", folder["masks"], "--out", out, "--model",
                    tiny_model, "--num-workers", "0", "--samples", "2")  # fmt: skip
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and os.strerror(code) in lines[-1]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # all outputs of an image or none: the first image's first sample was removed again
    assert not list(out.rglob("*.png"))


def test_strict_stops_at_the_first_failure(tmp_path, tiny_model):
    folder = make_mixed_folder(tmp_path)
    result = invoke(folder["images"], "--masks", folder["masks"], "--out", tmp_path / "out",
                    "--model", tiny_model, "--num-workers", "0", "--strict", "--json")  # fmt: skip
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["failed"] == 1 and summary["stopped_early"]
    assert summary["done"] < len(folder["good"])


# ----------------------------------------------------------------------------- accelerate


LAUNCH_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from inpaint_cli.run import RunOptions, run_folder

    summary = run_folder(RunOptions(images=Path(sys.argv[1]), masks=Path(sys.argv[2]),
                                    out=Path(sys.argv[3]), model=Path(sys.argv[4]),
                                    num_workers=0, batch_size=4, json_summary=True))
    # one file per rank: two ranks writing one file at once interleave their bytes
    name = f"summary.{summary['world_size']}.rank{os.environ.get('RANK', '0')}.json"
    Path(sys.argv[3], name).write_text(json.dumps(summary))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one(tmp_path, tiny_model):
    folder = make_mixed_folder(tmp_path)
    script = tmp_path / "launch_run.py"
    script.write_text(LAUNCH_SCRIPT)
    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script),
               *map(str, (folder["images"], folder["masks"], out, tiny_model))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    for rank in (0, 1):  # every rank returns the whole job's counts
        summary = json.loads((out / f"summary.2.rank{rank}.json").read_text())
        assert summary["world_size"] == 2
        assert (summary["done"], summary["failed"]) == (len(folder["good"]), 3)

    one = tmp_path / "one"
    run_folder(RunOptions(images=folder["images"], masks=folder["masks"], out=one,
                          model=tiny_model, num_workers=0, batch_size=4))  # fmt: skip
    two_files, one_files = _pngs(out), _pngs(one)
    assert sorted(two_files) == sorted(one_files)
    for name, data in one_files.items():
        a = np.asarray(Image.open(io.BytesIO(data)), np.int32)
        b = np.asarray(Image.open(io.BytesIO(two_files[name])), np.int32)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() <= 0.001, name
    assert (out / "failures.jsonl").read_text() == (one / "failures.jsonl").read_text()
    assert not list(out.glob("failures.rank*.jsonl"))


WORKERS_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import inpaint_cli.run as run_module
    from inpaint_cli.run import RunOptions, run_folder

    def feed_then_die(self, prepared):
        # the main process stops reading while the workers fill their queues, then dies as
        # under kill -9; stalling here, not after a fixed delay, makes the test independent of
        # how fast the machine fills holes
        time.sleep(2)
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        mine = [p for p in pids if open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]
                == str(os.getpid())]
        Path(sys.argv[4]).write_text(" ".join(mine))
        os.kill(os.getpid(), signal.SIGKILL)

    run_module._Runner.feed = feed_then_die
    run_folder(RunOptions(images=Path(sys.argv[1]), masks=Path(sys.argv[1]), out=Path(sys.argv[2]),
                          model=Path(sys.argv[3]), samples=4, num_workers=2, batch_size=1))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl")
def test_kill_9_leaves_no_loader_worker_behind(tmp_path, tiny_model):
    """Workers orphaned by a kill -9 used to hang on, holding the job's stdout open."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):  # large items: a worker blocks writing them to its queue
        Image.fromarray(_noise_image(rng, 600, 600)).save(images / f"img{index:02d}.png")
        _save_mask(images / f"img{index:02d}_mask.png", _box_mask(600, 600, HOLE))
    script, pids = tmp_path / "workers.py", tmp_path / "workers.pid"
    script.write_text(WORKERS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), images, tmp_path / "out", tiny_model, pids]
    job = subprocess.run(list(map(str, command)), capture_output=True, env=env, timeout=120)
    assert job.returncode == -9, job.stderr
    workers = [int(pid) for pid in pids.read_text().split()]
    assert workers, "the job started no workers"

    def alive(pid: int) -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")  # a zombie waiting to be reaped is dead

    deadline = time.monotonic() + 15
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert left == []
