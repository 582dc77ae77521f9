"""`inpaint train`: schedule pieces, overfitting, exact resume, faults, kills, multi-process.

Every training test runs the real tiny preset on real (tiny, generated) webdataset shards.
"""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from inpaint_cli import checkpoint as ckpt
from inpaint_cli.app import app
from inpaint_cli.checkpoint import CHECKPOINTS, export_model
from inpaint_cli.errors import InpaintError
from inpaint_cli.train import (
    SkipRule,
    TrainConfig,
    TrainHooks,
    caption_keep,
    default_kl_warmup,
    kl_warmup_weights,
    learning_rate,
    parse_model_config,
    train,
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
}


def write_square_shards(
    folder: Path,
    count: int,
    per_shard: int,
    *,
    embeddings: bool = False,
    seed: int = 0,
    captions: bool = True,
) -> str:
    """Shards of 16x16 PNGs: a coloured square on another colour, captioned by its colours.

    Returns the brace pattern of the shards. With `embeddings`, each sample also carries a
    4-float `emb.f32` member (as `inpaint shards --embed-captions` writes); without `captions`,
    no `txt` member.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    shards = -(-count // per_shard)
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                fg, bg = rng.choice(len(names), 2, replace=False)
                pixels = np.full((16, 16, 3), COLOURS[names[bg]], np.uint8)
                x, y = rng.integers(0, 8, 2)
                pixels[y : y + 8, x : x + 8] = COLOURS[names[fg]]
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "PNG")
                members = [("png", buffer.getvalue())]
                if captions:
                    members.append(("txt", f"a {names[fg]} square on {names[bg]}".encode()))
                if embeddings:
                    vector = np.zeros(4, "<f4")
                    vector[fg] = 1.0
                    members.append(("emb.f32", vector.tobytes()))
                for suffix, data in members:
                    info = tarfile.TarInfo(f"sample{index:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if shards == 1:
        return str(folder / "train-000000.tar")
    return str(folder / f"train-{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_square_shards(tmp_path_factory.mktemp("shards"), 48, 16)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons; each test gets a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny(shards: str, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=shards,
        out=str(out),
        preset="tiny",
        steps=10,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        val_every=1000,
        checkpoint_every=1000,
        captions=False,
        num_workers=0,
        log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def log(out: Path, name: str = "train.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("model", "ema", "optimizer"):
        for key, value in ckpt.read_tensors(folder / f"{name}.safetensors").items():
            tensors[f"{name}/{key}"] = value.double()
    return tensors


# ---- pure pieces -------------------------------------------------------------------------------


def test_kl_warmup_is_staggered_by_layer():
    assert kl_warmup_weights(0, 3, 10) == [0.0, 0.0, 0.0]
    assert kl_warmup_weights(5, 3, 10) == [0.5, 0.0, 0.0]
    assert kl_warmup_weights(10, 3, 10) == [1.0, 0.5, 0.0]
    assert kl_warmup_weights(20, 3, 10) == [1.0, 1.0, 1.0]
    assert kl_warmup_weights(0, 4, 0) == [1.0] * 4
    for step in range(0, 40):
        weights = kl_warmup_weights(step, 5, 8)
        assert weights == sorted(weights, reverse=True)  # upper layers never behind lower ones
        later = kl_warmup_weights(step + 1, 5, 8)
        assert all(b >= a for a, b in zip(weights, later, strict=True))
    # the default ramp finishes every layer by 5% of the run, and by step 1,000 of a long one
    for steps, layers in ((10000, 8), (400, 3), (40, 12), (100000, 8)):
        warmup = default_kl_warmup(steps, layers)
        finish = min(1000, steps // 20)
        assert kl_warmup_weights(finish, layers, warmup) == [1.0] * layers
        if warmup > 1:
            assert kl_warmup_weights(finish // 2, layers, warmup)[-1] < 1.0


def test_learning_rate_warms_up_then_decays_by_cosine():
    rates = [learning_rate(step, 1e-3, 10, 100, 0.1) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-3) == rates[9] == rates[10]
    assert all(b < a for a, b in zip(rates[10:], rates[11:], strict=False))
    assert learning_rate(100, 1e-3, 10, 100, 0.1) == pytest.approx(1e-4)
    assert learning_rate(5, 1e-3, 0, 100, 0.1) < 1e-3


def test_skip_rule_skips_nonfinite_and_spikes_but_follows_a_lasting_rise():
    rule = SkipRule(factor=10.0, window=20, min_history=5, clip_factor=3.0, grad_clip=200.0)
    assert rule.check(float("nan"), 1.0) == "nonfinite"
    assert rule.check(1.0, float("inf")) == "nonfinite"
    assert rule.check(1.0, 1e9) is None  # no history yet: only non-finite values are refused
    rule.history.clear()
    for _ in range(5):
        assert rule.check(1.0, 2.0) is None
    assert rule.clip_norm() == pytest.approx(6.0)
    assert rule.check(1.0, 25.0) == "spike"
    assert rule.check(1.0, 19.0) is None
    # the norm rises for good (VDVAE's fixed threshold would refuse every update from now on)
    decisions = [rule.check(1.0, 500.0) for _ in range(30)]
    assert decisions[0] == "spike"
    assert decisions[-1] is None
    assert decisions.count("spike") <= 20 // 2 + 1
    copy = SkipRule(10.0, 20, 5, 3.0, 200.0)
    copy.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert copy.threshold() == rule.threshold()


def test_caption_keep_drops_at_the_rate_and_always_drops_empty_captions():
    generator = torch.Generator().manual_seed(0)
    keep = caption_keep(["a cat"] * 20000, 0.1, generator)
    assert abs(1.0 - keep.mean().item() - 0.1) < 0.01
    assert caption_keep(["", "x", ""], 0.0, generator).tolist() == [0.0, 1.0, 0.0]
    # the random stream moves the same way whatever the captions are
    first, second = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    caption_keep(["a", "", "c"], 0.5, first)
    caption_keep(["", "", ""], 0.5, second)
    assert torch.equal(torch.rand(3, generator=first), torch.rand(3, generator=second))


def test_optimizer_and_rng_state_survive_safetensors_and_json(tmp_path):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, betas=(0.9, 0.9))
    for _ in range(3):
        layer(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    tensors, meta = ckpt.optimizer_to_tensors(optimizer.state_dict())
    ckpt.write_tensors(tmp_path, "o.safetensors", tensors)
    ckpt.write_json(tmp_path, "o.json", meta)
    restored = ckpt.optimizer_from_tensors(
        ckpt.read_tensors(tmp_path / "o.safetensors"), ckpt.read_json(tmp_path / "o.json")
    )
    fresh = torch.optim.AdamW(layer.parameters(), lr=0.5)
    fresh.load_state_dict(restored)
    original = optimizer.state_dict()
    assert fresh.state_dict()["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(fresh.state_dict()["state"][index][name], value)

    generator = torch.Generator().manual_seed(3)
    random.seed(5)
    np.random.seed(6)
    row, layout = ckpt.pack_rng(ckpt.rng_parts(generator))
    expected = (
        torch.rand(2),
        torch.rand(2, generator=generator),
        random.random(),
        np.random.rand(),
    )
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    generator.manual_seed(99)
    ckpt.restore_rng(ckpt.unpack_rng(row, json.loads(json.dumps(layout))), generator)
    again = (torch.rand(2), torch.rand(2, generator=generator), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_pruning_keeps_the_newest_and_the_best_by_validation_nll(tmp_path):
    scores = {2: 5.0, 4: 3.0, 6: 4.0, 8: None, 10: 6.0}
    for step, val_nll in scores.items():
        temp = ckpt.begin(tmp_path, step)
        ckpt.write_json(temp, "x.json", {"step": step})
        ckpt.finish(temp, {"step": step, "val_nll": val_nll})
        ckpt.prune(tmp_path, keep_last=2)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8, 10]
    assert ckpt.best_checkpoint(tmp_path).name == ckpt.checkpoint_name(4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000008",
        "step-00000010",
    ]  # deleted ones leave nothing behind


def test_scans_pass_over_damaged_checkpoints_without_deleting_them(tmp_path, capsys):
    for step, val_nll in {2: 5.0, 4: 3.0, 6: 4.0}.items():
        temp = ckpt.begin(tmp_path, step)
        ckpt.finish(temp, {"step": step, "val_nll": val_nll})
    folders = {step: folder for step, folder in ckpt.list_checkpoints(tmp_path)}
    damage = {
        4: "{bad",  # not JSON
        6: "[]",  # JSON, not an object
        8: json.dumps({"step": 8, "val_nll": -1.0, "files": {}}),  # forged: no format
    }
    (tmp_path / CHECKPOINTS / ckpt.checkpoint_name(8)).mkdir()
    for step, text in damage.items():
        (tmp_path / CHECKPOINTS / ckpt.checkpoint_name(step) / ckpt.STATE_FILE).write_text(text)
    capsys.readouterr()
    assert ckpt.best_checkpoint(tmp_path) == folders[2]  # the only complete one
    assert ckpt.prune(tmp_path, keep_last=1) == []
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6, 8]
    warnings = capsys.readouterr().out.splitlines()
    assert len(warnings) == 3  # each damaged checkpoint named once, however often it is scanned
    assert all(line.startswith("warning: skipping checkpoint ") for line in warnings)
    assert f"{folders[4] / ckpt.STATE_FILE}: unreadable" in warnings[0]


# ---- training ----------------------------------------------------------------------------------


def test_tiny_preset_overfits_a_handful_of_images(tmp_path):
    few = write_square_shards(tmp_path / "few", 8, 8)
    out = tmp_path / "run"
    summary = train(
        tiny(
            few,
            out,
            steps=80,
            lr=1e-2,
            mask_kinds="center",
            val_data=few,
            val_every=40,
            val_samples=8,
        )
    )
    records = log(out)
    start = records[0]["nll_bits_per_dim"]  # the untrained model, on the first batch
    end = np.mean([r["nll_bits_per_dim"] for r in records[-5:]])
    # the untrained model already fills like the pyramid fill, so the drop is in bits, not %
    assert end < start - 2.0, (start, end)
    for record in records:
        assert all(np.isfinite(k) and k >= 0 for k in record["kl_bits_per_dim"])
    validation = log(out, "val.jsonl")
    assert [r["step"] for r in validation] == [40, 80]
    assert validation[-1]["nll_bits_per_dim"] < start
    assert summary["steps"] == 80 and summary["skipped_updates"] == 0
    # the run folder has what `inpaint run` and `inpaint report` need
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 1 and run["config"]["preset"] == "tiny"
    assert run["versions"]["torch"] and run["versions"]["accelerate"] and "command_line" in run
    from model.hvae import HVAE

    for folder in ("model", "best"):
        model = HVAE.from_pretrained(out / folder)
        assert model.config.caption_dim == 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path, shards):
    """2K steps in one go vs K steps, a stop, --resume, K more: same weights, EMA, optimizer."""
    steps, half = 12, 6
    settings = dict(steps=steps, checkpoint_every=half, num_workers=2, val_every=half)
    whole = tmp_path / "whole"
    train(tiny(shards, whole, val_data=shards, val_samples=8, **settings))

    class Stop(Exception):
        pass

    def stop_at_half(step: int) -> None:
        if step == half:
            raise Stop

    parts = tmp_path / "parts"
    config = tiny(shards, parts, val_data=shards, val_samples=8, **settings)
    with pytest.raises(Stop):
        train(config, TrainHooks(after_step=stop_at_half))
    assert [step for step, _ in ckpt.list_checkpoints(parts)] == [half]
    summary = train(replace(config, resume=True))
    assert summary["start_step"] == half and summary["steps"] == steps

    final = ckpt.checkpoint_name(steps)
    a = checkpoint_tensors(whole / "checkpoints" / final)
    b = checkpoint_tensors(parts / "checkpoints" / final)
    first = checkpoint_tensors(parts / "checkpoints" / ckpt.checkpoint_name(half))
    assert a.keys() == b.keys()
    tolerance = 1e-5
    for name in ("model/", "ema/", "optimizer/"):
        keys = [key for key in a if key.startswith(name)]
        assert keys
        gap = max((a[k] - b[k]).abs().max().item() for k in keys)
        moved = max((a[k] - first[k]).abs().max().item() for k in keys)
        assert gap <= tolerance < moved / 100, (name, gap, moved)
    # the logs read as one run: every step once, same values
    assert [r["step"] for r in log(parts)] == list(range(1, steps + 1))
    for x, y in zip(log(whole), log(parts), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert [r["nll_bits_per_dim"] for r in log(whole, "val.jsonl")] == pytest.approx(
        [r["nll_bits_per_dim"] for r in log(parts, "val.jsonl")], rel=1e-5
    )
    run = json.loads((parts / "run.json").read_text())
    assert [entry["step"] for entry in run["resumes"]] == [half]


def test_patience_stops_after_validations_without_a_new_best(tmp_path, shards, monkeypatch):
    import inpaint_cli.train as train_module

    # scripted validation NLLs: the best is at step 2, then none beats it
    scripted = iter([5.0, 4.9, 4.95, 4.92, 4.93, 4.99])
    monkeypatch.setattr(
        train_module, "validate", lambda *args: {"nll_bits_per_dim": next(scripted)}
    )
    out = tmp_path / "run"
    config = tiny(shards, out, steps=10, val_data=shards, val_every=1, patience=2)
    summary = train(config)
    assert (summary["steps"], summary["stopped_early"], summary["best_step"]) == (4, True, 2)
    assert [step for step, _ in ckpt.list_checkpoints(out)][-1] == 4
    assert (out / "model" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "val.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    # a resume goes on until the next validation, which again brings no new best
    summary = train(replace(config, resume=True))
    assert (summary["start_step"], summary["steps"], summary["stopped_early"]) == (4, 5, True)
    # without patience the same scripted run goes to the end
    scripted = iter([5.0, 4.9] + [4.95] * 8)
    summary = train(tiny(shards, tmp_path / "all", steps=10, val_data=shards, val_every=1))
    assert (summary["steps"], summary["stopped_early"]) == (10, False)
    with pytest.raises(InpaintError, match="--patience needs --val-data"):
        train(tiny(shards, tmp_path / "noval", patience=2))


def test_log_rows_say_how_many_steps_they_average(tmp_path, shards):
    config = tiny(shards, tmp_path / "run", steps=6, log_every=4, checkpoint_every=3)

    class Stop(Exception):
        pass

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(config, TrainHooks(after_step=stop_at_3))
    train(replace(config, resume=True))
    rows = log(tmp_path / "run")
    assert [(r["step"], r["steps_averaged"]) for r in rows] == [(4, 1), (6, 2)]
    train(tiny(shards, tmp_path / "whole", steps=6, log_every=4))
    assert [r["steps_averaged"] for r in log(tmp_path / "whole")] == [4, 2]


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, shards):
    out = tmp_path / "run"
    summary = train(tiny(shards, out, steps=3, resume=True))
    assert summary["start_step"] == 0 and summary["steps"] == 3


def test_resume_skips_a_checkpoint_with_a_malformed_skip_rule(tmp_path, shards, capsys):
    # as one with a malformed step: named in a warning and passed over for the older one
    config = tiny(shards, tmp_path / "run", steps=4, checkpoint_every=2)
    train(config)
    state_path = tmp_path / "run" / "checkpoints" / "step-00000004" / "state.json"
    state = json.loads(state_path.read_text())
    state["skip_rule"] = {"history": "x"}
    state_path.write_text(json.dumps(state))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()
    summary = train(replace(config, resume=True))
    assert summary["start_step"] == 2 and summary["steps"] == 4
    warning = f"warning: skipping checkpoint {state_path}: malformed skip_rule"
    assert warning in capsys.readouterr().out.splitlines()


def _garbage_rng_rows(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, header, data
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(data)


def _edit_rng_layout(old: str, new: str):
    def edit(path: Path) -> None:
        path.write_text(path.read_text().replace(old, new, 1))

    return edit


@pytest.mark.parametrize(
    "name, damage",
    [
        ("rng.safetensors", _garbage_rng_rows),
        ("rng.json", _edit_rng_layout("torch.uint8", "torch.uinu8")),  # no such dtype
        ("rng.json", _edit_rng_layout('"layout"', '"lay0ut"')),
        ("rng.json", _edit_rng_layout("5056", "5055")),
    ],
    ids=["garbage-state", "unknown-dtype", "no-layout", "short-shape"],
)
def test_resume_skips_a_checkpoint_whose_rng_state_is_damaged(
    tmp_path, shards, capsys, name, damage
):
    # damage that keeps the file's size (a bit flip, an edit) passes the size check; restoring
    # it failed the resume with a traceback. Named in a warning and passed over, as other damage
    config = tiny(shards, tmp_path / "run", steps=4, checkpoint_every=2)
    train(config)
    path = tmp_path / "run" / CHECKPOINTS / ckpt.checkpoint_name(4) / name
    before = path.read_bytes()
    damage(path)
    assert path.read_bytes() != before and path.stat().st_size == len(before)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()
    summary = train(replace(config, resume=True))
    assert summary["start_step"] == 2 and summary["steps"] == 4
    warnings = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping checkpoint {path}: ")


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: "{bad",
        lambda state: "[]",
        lambda state: json.dumps(
            {k: v for k, v in state.items() if k != "format"} | {"val_nll": -1.0}
        ),
    ],
    ids=["not-json", "not-an-object", "forged-best-without-format"],
)
def test_resume_and_export_pass_over_damaged_checkpoints(tmp_path, shards, capsys, damage):
    # steps 3 and 4 damaged: resume and export fall back to step 2, and nothing that scans the
    # checkpoints later (choosing the best, pruning) trips over the damaged ones
    out = tmp_path / "run"
    config = tiny(shards, out, steps=4, checkpoint_every=1, keep_last=10, val_data=shards)
    train(replace(config, val_every=1, val_samples=8))
    for step in (3, 4):
        path = out / CHECKPOINTS / ckpt.checkpoint_name(step) / ckpt.STATE_FILE
        path.write_text(damage(json.loads(path.read_text())))
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert f"from {out / CHECKPOINTS}/step-0000000" in result.stdout
    assert "step-00000003" not in result.stdout.splitlines()[-1]
    assert "step-00000004" not in result.stdout.splitlines()[-1]
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    ckpt._WARNED.clear()  # warnings are given once per process; this is a second command
    capsys.readouterr()
    summary = train(replace(config, steps=6, keep_last=2, resume=True))
    assert summary["start_step"] == 2 and summary["steps"] == 6
    output = capsys.readouterr().out
    assert f"warning: skipping checkpoint {out / CHECKPOINTS / 'step-00000004'}" in output
    for _, folder in ckpt.list_checkpoints(out):
        ckpt.verify(folder)  # the damaged ones were replaced when their steps came again


@pytest.mark.parametrize("text", ["[1, 2]", "{bad"])
def test_a_damaged_run_json_is_a_one_line_error(tmp_path, shards, text):
    out = tmp_path / "run"
    config = tiny(shards, out, steps=2, checkpoint_every=1)
    train(config)
    (out / "run.json").write_text(text)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(InpaintError) as caught:
        train(replace(config, steps=4, resume=True))
    assert caught.value.exit_code == 1
    assert str(caught.value).startswith(f"{out / 'run.json'}: ")
    assert str(caught.value).endswith("remove it to resume with a new one")
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [1, 2]  # nothing was changed
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {out / 'run.json'}: ")


def test_resume_with_another_model_names_the_first_differing_tensor(tmp_path, shards):
    out = tmp_path / "run"
    train(tiny(shards, out, steps=2))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    narrower = {"widths": {"16": 8, "8": 8, "4": 8, "1": 8}}
    with pytest.raises(InpaintError) as caught:
        train(tiny(shards, out, steps=4, model_config=narrower, resume=True))
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert message.startswith(f"{out / CHECKPOINTS / 'step-00000002' / 'model.safetensors'}: ")
    assert "does not fit this model" in message
    assert "tensor '" in message and "the config needs (8" in message


def test_injected_inf_gradient_and_spike_are_skipped_and_counted(tmp_path, shards):
    injections = {22: "inf", 26: "spike"}
    before: dict[int, list[torch.Tensor]] = {}
    unchanged_after: dict[int, bool] = {}
    holder: dict[str, torch.nn.Module] = {}

    def after_backward(step: int, model: torch.nn.Module) -> None:
        holder["model"] = model
        before[step] = [p.detach().clone() for p in model.parameters()]
        kind = injections.get(step)
        if kind == "inf":
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = np.inf
        elif kind == "spike":
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e4)

    def after_step(step: int) -> None:
        params = list(holder["model"].parameters())
        unchanged_after[step - 1] = all(
            torch.equal(a, b) for a, b in zip(before[step - 1], params, strict=True)
        )

    out = tmp_path / "run"
    summary = train(
        tiny(shards, out, steps=30, checkpoint_every=30),
        TrainHooks(after_backward=after_backward, after_step=after_step),
    )
    assert summary["skipped_nonfinite"] == 1 and summary["skipped_spike"] == 1
    assert summary["skipped_updates"] == len(injections)
    assert log(out)[-1]["skipped_updates"] == len(injections)
    assert unchanged_after[22] and unchanged_after[26]  # the skipped updates changed nothing
    assert not unchanged_after[23]  # ...and training went on afterwards
    final = checkpoint_tensors(out / "checkpoints" / ckpt.checkpoint_name(30))
    assert all(torch.isfinite(t).all() for t in final.values())


def _train_in_child(config: TrainConfig, kill_before_publish_at: int | None = None) -> None:
    """Child process body: train, optionally SIGKILLing itself just before a rename."""
    if kill_before_publish_at is not None:
        publish = ckpt.publish

        def publish_or_die(temp: Path, final: Path) -> None:
            if final.name == ckpt.checkpoint_name(kill_before_publish_at):
                os.kill(os.getpid(), signal.SIGKILL)
            publish(temp, final)

        ckpt.publish = publish_or_die
    train(config)


@pytest.fixture(scope="module")
def fork_server() -> None:
    """The fork server starts with the first child and imports the heavy modules once, so each
    child starts in about a second. A fork server, not a plain fork: forking this pytest
    process copies whatever threads earlier tests left (OpenMP pools, data-loader and writer
    threads) with their locks held, and the child then hung now and then."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["inpaint_cli.train", "inpaint_cli.data", "model.hvae", "accelerate", "webdataset"]
    )


def _fork(target, *args) -> multiprocessing.Process:
    # the kill is a real SIGKILL of a real process
    process = multiprocessing.get_context("forkserver").Process(target=target, args=args)
    process.start()
    return process


def _children() -> list[int]:
    own = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115
        except OSError:
            continue
        if entry.isdigit() and stat.rsplit(")", 1)[1].split()[1] == own:
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("signum", "workers"), [(signal.SIGTERM, 0), (signal.SIGINT, 1)])
def test_a_signal_checkpoints_the_step_in_progress_and_resume_goes_on(
    tmp_path, shards, signum, workers
):
    """Ctrl-C or a scheduler's SIGTERM loses no step: the step is checkpointed, exit 128+N.

    The signal also reaches the loader's worker (as Ctrl-C reaches the terminal's whole process
    group): a worker that ended there would break the loader before the checkpoint."""
    out = tmp_path / "run"
    config = tiny(shards, out, steps=10, num_workers=workers)

    def signal_at_step_3(step: int) -> None:
        if step == 3:
            for pid in [*_children(), os.getpid()]:
                os.kill(pid, signum)

    # compared with what it was, not with SIG_IGN: a job started in the background by a
    # non-interactive shell begins with SIGINT ignored
    handler_before = signal.getsignal(signum)
    with pytest.raises(InpaintError) as error:
        train(config, TrainHooks(after_step=signal_at_step_3))
    assert error.value.exit_code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} at step 4" in str(error.value)
    assert "--resume" in str(error.value)
    assert assert_every_checkpoint_complete(out) == [4]  # no periodic one before the stop
    assert signal.getsignal(signum) == handler_before  # train's handler is gone again
    summary = train(replace(config, resume=True))
    assert summary["start_step"] == 4 and summary["steps"] == 10
    assert [r["step"] for r in log(out)] == list(range(1, 11))


def test_stop_request_a_later_ctrl_c_forces_an_echo_or_a_sigterm_does_not(monkeypatch):
    from inpaint_cli.train import StopRequest

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # the launcher forwarding the terminal's Ctrl-C
        clock[0] += 5
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM only asks again
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C again, seconds later: stop now
    assert signal.getsignal(signal.SIGINT) is before


def assert_every_checkpoint_complete(out: Path) -> list[int]:
    steps = []
    for step, folder in ckpt.list_checkpoints(out):
        state = ckpt.verify(folder)
        assert state["step"] == step
        checkpoint_tensors(folder)  # parses
        steps.append(step)
    names = (
        {p.name for p in (out / "checkpoints").iterdir()}
        if (out / "checkpoints").exists()
        else set()
    )
    assert all(n.startswith((".tmp-", ".del-")) or n.startswith("step-") for n in names)
    return steps


def test_kill_between_temp_write_and_rename_loses_nothing(tmp_path, shards, fork_server):
    out = tmp_path / "run"
    config = tiny(shards, out, steps=6, checkpoint_every=2)
    child = _fork(_train_in_child, config, 4)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    temp = out / "checkpoints" / ".tmp-step-00000004"
    assert temp.is_dir() and (temp / "state.json").is_file()  # fully written, not yet renamed
    assert assert_every_checkpoint_complete(out) == [2]
    summary = train(replace(config, resume=True))
    assert summary["start_step"] == 2 and summary["steps"] == 6
    assert not temp.exists()
    assert assert_every_checkpoint_complete(out)[-1] == 6


def _newest_logged_step(out: Path) -> int:
    path = out / "train.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # a line cut short by the kill
    return max(steps)


def _temp_folders(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")] if root.exists() else []


def _wait_until(condition, child, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and child.is_alive():
        if condition():
            return True
        time.sleep(0.0005)
    return False


def test_sigkill_at_random_moments_and_mid_checkpoint_then_resume(tmp_path, shards, fork_server):
    out = tmp_path / "run"
    steps = 40
    config = tiny(shards, out, steps=steps, checkpoint_every=2, keep_last=2, resume=True)
    rng = random.Random(1234)
    kills, mid_write, newest = 0, 0, 0
    for attempt in range(6):
        child = _fork(_train_in_child, config)
        seen = _newest_logged_step(out)
        # wait for fresh progress, so every kill lands in training, not in start-up
        _wait_until(lambda seen=seen: _newest_logged_step(out) > seen, child)
        kind = attempt % 3
        if kind == 0:  # a random moment
            time.sleep(rng.uniform(0.0, 0.4))
        elif kind == 1:  # a checkpoint write has just begun
            _wait_until(lambda: bool(_temp_folders(out)), child)
        else:  # a checkpoint write is part-way: some files written, state.json not yet
            _wait_until(
                lambda: any(
                    any(f.is_file() for f in t.iterdir()) and not (t / "state.json").exists()
                    for t in _temp_folders(out)
                ),
                child,
            )
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join(30)
        mid_write += bool(_temp_folders(out))
        complete = assert_every_checkpoint_complete(out)
        assert not complete or complete[-1] >= newest  # nothing complete was lost
        newest = complete[-1] if complete else 0
    assert kills >= 5 and mid_write >= 1, (kills, mid_write)
    assert 0 < newest < steps  # the kills interrupted a run that was making progress
    summary = train(config)
    assert summary["start_step"] == newest and summary["steps"] == steps
    assert assert_every_checkpoint_complete(out)[-1] == steps
    assert not _temp_folders(out)
    logged = [r["step"] for r in log(out)]
    assert logged == list(range(1, steps + 1))  # no step twice, none missing


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_during_a_checkpoint_is_a_clear_error(
    tmp_path, shards, monkeypatch, code
):
    import types

    from inpaint_cli import images

    def fail_writes(step: int) -> None:
        # from now on every project write fails the way a full or read-only disk makes it
        def write(fd, data):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(images, "os", types.SimpleNamespace(**{**vars(os), "write": write}))

    out = tmp_path / "run"
    config = tiny(shards, out, steps=4, checkpoint_every=2)
    with pytest.raises(InpaintError) as caught:
        train(config, TrainHooks(after_step=lambda step: step == 1 and fail_writes(step)))
    assert os.strerror(code) in str(caught.value) and caught.value.exit_code == 1
    assert str(out / "checkpoints") in str(caught.value)
    assert list((out / "checkpoints").iterdir()) == []  # no partial checkpoint left behind
    monkeypatch.undo()
    assert train(replace(config, resume=True))["steps"] == 4


def test_time_based_checkpoints_and_gradient_accumulation(tmp_path, shards):
    out = tmp_path / "run"
    summary = train(tiny(shards, out, steps=3, grad_accum=2, checkpoint_minutes=1e-9))
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [1, 2, 3]  # each step is "due"
    rank = json.loads((out / "ranks" / "rank-0.json").read_text())
    assert rank["samples_seen_this_session"] == 3 * 2 * 8
    state = ckpt.verify(out / "checkpoints" / ckpt.checkpoint_name(3))
    assert state["batches_per_rank"] == 6
    assert summary["steps"] == 3


def test_checkpoint_minutes_zero_turns_time_based_checkpoints_off(tmp_path, shards):
    out = tmp_path / "run"
    train(tiny(shards, out, steps=3, checkpoint_minutes=0.0))
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [3]  # only the final one


def test_validation_data_that_decodes_no_image_stops_training(tmp_path, shards):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive " * 100)
    out = tmp_path / "run"
    config = tiny(shards, out, steps=4, val_data=str(junk), val_every=2, val_samples=8)
    with pytest.raises(InpaintError) as caught:  # refused before training starts
        train(config)
    assert caught.value.exit_code == 1
    assert str(caught.value) == f"--val-data {junk}: no decodable image (see the warnings)"
    assert not ckpt.list_checkpoints(out)

    # readable at the start, unreadable at the validation of step 2: that step is checkpointed,
    # training stops, and a resume with readable validation data goes on from there
    val = write_square_shards(tmp_path / "val", 8, 8)
    good = Path(val).read_bytes()
    from accelerate.state import AcceleratorState, GradientState

    def break_val_data(step: int) -> None:
        if step == 1:
            Path(val).write_bytes(junk.read_bytes())

    with pytest.raises(InpaintError) as caught:
        train(replace(config, val_data=val), TrainHooks(after_step=break_val_data))
    assert caught.value.exit_code == 1
    assert str(caught.value).startswith(f"--val-data {val}: no image could be decoded at the ")
    assert "validation of step 2" in str(caught.value)
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [2]
    Path(val).write_bytes(good)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    summary = train(replace(config, val_data=val, resume=True))
    assert summary["start_step"] == 2 and summary["steps"] == 4
    assert [record["step"] for record in log(out, "val.jsonl")] == [4]


def test_cli_trains_and_resumes(tmp_path, shards):
    out = tmp_path / "run"
    arguments = [
        "train",
        "--data",
        shards,
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--no-captions",
        "--num-workers",
        "0",
        "--fill-loss",
        "1.5",
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["batch_size"] == 4 and run["command_line"]
    assert run["config"]["fill_loss"] == 1.5
    result = CliRunner().invoke(app, arguments + ["--resume"])
    assert result.exit_code == 0 and "trained 0 steps" in result.output


# ---- options and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"preset": "huge"}, "preset"),
        ({"hole_area": "0.9-0.1"}, "hole-area"),
        ({"mask_kinds": "center,blob"}, "blob"),
        ({"mixed_precision": "fp8"}, "mixed-precision"),
        ({"data": "/nonexistent/train-000000.tar"}, "/nonexistent/train-000000.tar"),
        ({"model_config": {"foo": 1}}, "unknown config keys ['foo']"),
        ({"model_config": {"norm": "layer"}}, "norm must be"),
        ({"model_config": {"caption_dim": 8}}, "caption_dim is set by --captions"),
        ({"model_config": {"caption_strength": 0.5}}, "caption_strength is an inference setting"),
        ({"fill_loss": -1.0}, "--fill-loss"),
        ({"fill_loss": float("nan")}, "--fill-loss"),
    ],
)
def test_bad_options_are_refused_with_a_clear_error(tmp_path, shards, overrides, fragment):
    with pytest.raises(InpaintError) as caught:
        train(tiny(shards, tmp_path / "run", **overrides))
    assert fragment in str(caught.value) and caught.value.exit_code == 2


def test_model_config_replaces_preset_fields_and_is_saved(tmp_path, shards):
    assert parse_model_config(["norm=group", 'widths={"16": 8}', "bottleneck=0.5"]) == {
        "norm": "group",
        "widths": {"16": 8},
        "bottleneck": 0.5,
    }
    with pytest.raises(InpaintError, match="KEY=VALUE"):
        parse_model_config(["norm"])
    out = tmp_path / "run"
    overrides = {"norm": "group", "pixel_distribution": "gaussian", "num_mixtures": 3}
    train(tiny(shards, out, steps=2, model_config=overrides))
    saved = json.loads((out / "model" / "config.json").read_text())
    assert {key: saved[key] for key in overrides} == overrides
    assert saved["resolution"] == 16  # the rest is the tiny preset
    # a resume rebuilds the same model from the recorded options
    assert train(tiny(shards, out, steps=3, model_config=overrides, resume=True))["steps"] == 3


def test_fill_loss_is_added_to_the_loss_and_validation_scores_the_fill(tmp_path, shards):
    runs = {}
    for weight in (0.0, 5.0):
        out = tmp_path / f"fill-{weight}"
        config = tiny(shards, out, steps=4, val_data=shards, val_every=2, val_samples=8)
        train(replace(config, fill_loss=weight))
        runs[weight] = (log(out), log(out, "val.jsonl"))
    (plain, plain_val), (filled, filled_val) = runs[0.0], runs[5.0]
    # same weights and batch at step 1: the ELBO is untouched (the T=0 pass draws no random
    # numbers), and the loss gains 5 x the fill's squared error
    assert filled[0]["nll_bits_per_dim"] == pytest.approx(plain[0]["nll_bits_per_dim"], rel=1e-6)
    assert filled[0]["loss"] > plain[0]["loss"] + 0.01
    for record in plain_val + filled_val:  # scored whether or not it is trained on
        assert 0.0 < record["fill_psnr_db"] <= 100.0
    assert plain_val[0]["fill_psnr_db"] != filled_val[0]["fill_psnr_db"]  # training moved it


def test_export_turns_any_checkpoint_into_a_model_folder(tmp_path, shards):
    from model.hvae import HVAE

    out = tmp_path / "run"
    config = tiny(shards, out, steps=4, checkpoint_every=2, val_data=shards, val_every=2)
    train(replace(config, val_samples=8))

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return HVAE.from_pretrained(folder).state_dict()

    assert export_model(out, tmp_path / "s4", step=4).name == "step-00000004"
    final, step4 = weights(out / "model"), weights(tmp_path / "s4")
    assert all(torch.equal(final[k], step4[k]) for k in final)  # the run's last EMA export
    export_model(out, tmp_path / "s2", step=2)
    step2 = weights(tmp_path / "s2")
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)
    default = export_model(out, tmp_path / "default")
    best = weights(out / "best")
    chosen = weights(tmp_path / "default")
    assert default.name in ("step-00000002", "step-00000004")
    assert all(torch.equal(best[k], chosen[k]) for k in best)  # the default is the best
    with pytest.raises(InpaintError, match=r"no checkpoint at step 3 \(there are: 2, 4\)"):
        export_model(out, tmp_path / "s3", step=3)
    assert not (tmp_path / "s3").exists()
    with pytest.raises(InpaintError, match="needs a model trained with captions"):
        export_model(out, tmp_path / "strength", caption_strength=0.5)
    assert not (tmp_path / "strength").exists()
    result = CliRunner().invoke(
        app, ["export", str(out), "--step", "2", "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "config.json").is_file()
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no checkpoints" in result.output


def test_export_never_overwrites_a_checkpoint_or_other_files(tmp_path, shards):
    out = tmp_path / "run"
    train(tiny(shards, out, steps=2, checkpoint_every=1))
    step2 = out / CHECKPOINTS / ckpt.checkpoint_name(2)
    elsewhere = tmp_path / "copied-checkpoint"  # a checkpoint outside the run it came from
    shutil.copytree(step2, elsewhere)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(step2)
    refused = {
        step2: "inside the run's checkpoints folder",
        out / CHECKPOINTS: "inside the run's checkpoints folder",
        tmp_path / "link": "inside the run's checkpoints folder",
        elsewhere: "a training checkpoint, not a model folder",
        notes: "holds files but is not a model folder (no config.json)",
        notes / "todo.txt": "not a folder",
        out / "model": "the run's own model/ folder",  # training writes the newest step there
        out / "best": "the run's own best/ folder",  # and the best by validation there
    }

    def snapshot() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = snapshot()
    for target, problem in refused.items():
        result = CliRunner().invoke(app, ["export", str(out), "--step", "1", "--out", str(target)])
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {target}: {problem}")
    assert snapshot() == before  # not one byte written anywhere

    # a new or empty folder is fine, and so is exporting again over a model folder
    (tmp_path / "empty").mkdir()
    export_model(out, tmp_path / "empty", step=1)
    assert export_model(out, tmp_path / "empty", step=2) == step2
    exported = ckpt.read_tensors(tmp_path / "empty" / "model.safetensors")
    ema = ckpt.read_tensors(step2 / "ema.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)


def test_export_checks_the_weights_against_the_config_before_building_the_model(
    tmp_path, shards, monkeypatch
):
    from model.hvae import HVAE

    out = tmp_path / "run"
    train(tiny(shards, out, steps=1, checkpoint_every=1))
    build = HVAE.__init__

    def meta_only(self, config):
        # fail instead of allocating: a regression must not take the machine's memory
        assert torch.empty(0).device.type == "meta", "the model was built for real"
        build(self, config)

    monkeypatch.setattr(HVAE, "__init__", meta_only)
    run = json.loads((out / "run.json").read_text())
    widths = run["model_config"]["widths"]
    run["model_config"]["widths"] = {size: 4096 for size in widths}  # ~200 GiB of weights
    run["model_config"]["bottleneck"] = 4.0
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(InpaintError) as caught:
        export_model(out, tmp_path / "model")
    assert caught.value.exit_code == 1
    assert str(caught.value).startswith(
        f"{out / CHECKPOINTS / ckpt.checkpoint_name(1)}: weights do not fit the run's model "
        "config: tensor '"
    )
    assert "the config needs (16384," in str(caught.value)
    assert not (tmp_path / "model").exists()


def test_fp16_on_cpu_is_refused(tmp_path, shards):
    with pytest.raises(InpaintError, match="fp16.*GPU") as caught:
        train(tiny(shards, tmp_path / "run", mixed_precision="fp16"))
    assert caught.value.exit_code == 2
    assert not (tmp_path / "run").exists()


def test_cli_reports_errors_in_one_line(tmp_path, shards):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            shards,
            "--out",
            str(tmp_path / "r"),
            "--preset",
            "tiny",
            "--mixed-precision",
            "fp16",
            "--no-captions",
        ],
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --mixed-precision fp16")


def test_a_run_with_checkpoints_is_not_overwritten_without_resume(tmp_path, shards):
    out = tmp_path / "run"
    train(tiny(shards, out, steps=2))
    with pytest.raises(InpaintError, match="--resume"):
        train(tiny(shards, out, steps=2))
    summary = train(tiny(shards, out, steps=4, resume=True))
    assert summary["start_step"] == 2 and summary["steps"] == 4


def test_a_second_training_into_a_run_folder_in_use_is_refused(tmp_path, shards):
    from inpaint_cli.images import output_lock

    out = tmp_path / "run"
    train(tiny(shards, out, steps=2))
    with output_lock(out, "train"):  # as a running `inpaint train` holds it
        with pytest.raises(InpaintError, match="another `inpaint train` is writing") as error:
            train(tiny(shards, out, steps=4, resume=True))
    assert error.value.exit_code == 2
    summary = train(tiny(shards, out, steps=4, resume=True))  # the lock went with its holder
    assert summary["start_step"] == 2 and summary["steps"] == 4


def test_bf16_trains_on_cpu(tmp_path, shards, monkeypatch, capsys):
    from inpaint_cli import train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: True)
    summary = train(tiny(shards, tmp_path / "run", steps=3, mixed_precision="bf16"))
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert "without bf16 instructions" not in capsys.readouterr().out
    # on a CPU that only emulates bf16 the run still trains, with one warning line
    _reset_accelerate()
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    train(tiny(shards, tmp_path / "slow", steps=1, mixed_precision="bf16"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "bf16 instr" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --mixed-precision bf16")


def test_cpu_has_bf16_reads_the_flags():
    from inpaint_cli.train import cpu_has_bf16

    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\n"
    assert cpu_has_bf16(x86.format("avx512_bf16")) is True
    assert cpu_has_bf16(x86.format("amx_bf16 amx_tile")) is True
    assert cpu_has_bf16(x86.format("avx512bw")) is False
    assert cpu_has_bf16("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n") is True
    assert cpu_has_bf16("processor\t: 0\nFeatures\t: fp asimd\n") is False
    assert cpu_has_bf16("nothing useful") is None


# ---- captions ----------------------------------------------------------------------------------


class CountingEncoder:
    """Stands in for conditioning.TextEncoder (the real one takes ~20 s to load here)."""

    instances: list[CountingEncoder] = []

    def __init__(self, path=None, device="cpu") -> None:
        self.dim, self.calls = 4, 0
        CountingEncoder.instances.append(self)

    def encode(self, captions):
        self.calls += 1
        return torch.stack([torch.full((4,), float(len(c))) for c in captions])

    def identity(self):
        return {"name": "counting", "dim": 4, "weights_hash": "0" * 64}


def test_no_captions_never_loads_the_text_encoder(tmp_path, shards, monkeypatch):
    import conditioning

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(conditioning, "TextEncoder", refuse)
    train(tiny(shards, tmp_path / "run", steps=2))
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["caption_dim"] == 0 and config["text_encoder"] is None


def test_captions_use_shard_embeddings_and_record_the_encoder(tmp_path, monkeypatch):
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", CountingEncoder)
    CountingEncoder.instances.clear()
    embedded = write_square_shards(tmp_path / "embedded", 16, 16, embeddings=True)
    keeps = []

    def after_backward(step, model):  # every parameter, the empty caption included, has a grad
        assert all(p.grad is not None for p in model.parameters())
        keeps.append(step)

    out = tmp_path / "run"
    train(
        tiny(
            embedded,
            out,
            steps=3,
            captions=True,
            caption_dropout=0.5,
            val_data=embedded,
            val_every=3,
            val_samples=8,
        ),
        TrainHooks(after_backward=after_backward),
    )
    assert np.isfinite(log(out, "val.jsonl")[0]["nll_bits_per_dim"])
    assert CountingEncoder.instances[-1].calls == 0  # the shards carried the embeddings
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["caption_dim"] == 4 and config["text_encoder"]["name"] == "counting"
    assert config["caption_strength"] == 1.0  # trained on whole captions
    assert keeps == [0, 1, 2]
    result = CliRunner().invoke(
        app, ["export", str(out), "--out", str(tmp_path / "tuned"), "--caption-strength", "0.3"]
    )
    assert result.exit_code == 0, result.output
    tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert tuned == {**config, "caption_strength": 0.3}

    plain = write_square_shards(tmp_path / "plain", 16, 16)
    CountingEncoder.instances.clear()
    train(tiny(plain, tmp_path / "run2", steps=2, captions=True))
    assert CountingEncoder.instances[-1].calls == 2  # one encode per batch without embeddings


def test_text_encoder_must_match_the_shards_embeddings_and_the_resumed_run(
    tmp_path, monkeypatch, capsys
):
    """Shards embedded by one encoder trained silently under another's name, and a resume with
    another encoder of the same size went on, so run and eval then refused the model."""
    import conditioning

    class OtherEncoder(CountingEncoder):
        def identity(self):
            return {"name": "other", "dim": 4, "weights_hash": "1" * 64}

    def pick(path=None, device="cpu"):
        return (OtherEncoder if path and Path(path).name == "other" else CountingEncoder)(path)

    monkeypatch.setattr(conditioning, "TextEncoder", pick)
    embedded = write_square_shards(tmp_path / "embedded", 16, 16, embeddings=True)
    record = {"text_encoder": {"name": "counting", "dim": 4, "weights_hash": "0" * 64}}
    (tmp_path / "embedded" / "shards.json").write_text(json.dumps(record))
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative --text-encoder, as typed
    out = tmp_path / "run"
    CountingEncoder.instances.clear()
    train(tiny(embedded, out, steps=2, captions=True, text_encoder="other", checkpoint_every=2))
    printed = capsys.readouterr().out
    assert "caption embeddings in these shards come from text encoder 'counting'" in printed
    assert CountingEncoder.instances[-1].calls == 2  # every batch embedded again
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["text_encoder"]["name"] == "other"
    # run.json names the encoder from anywhere: inpaint report loads it for its sample grid
    recorded = json.loads((out / "run.json").read_text())["config"]["text_encoder"]
    assert recorded == str(tmp_path / "other")
    _reset_accelerate()
    with pytest.raises(InpaintError, match="trained with text encoder 'other'"):
        train(tiny(embedded, out, steps=4, captions=True, resume=True))
    _reset_accelerate()
    # the same encoder from another path is the same encoder: the resume goes on; without its
    # --val-data it says that validation stops
    val = write_square_shards(tmp_path / "val", 8, 8)
    train(tiny(embedded, tmp_path / "run2", steps=2, captions=True, val_data=val, val_every=2,
               val_samples=8, checkpoint_every=2))  # fmt: skip
    capsys.readouterr()
    _reset_accelerate()
    train(tiny(embedded, tmp_path / "run2", steps=3, captions=True, resume=True))
    assert "resuming without --val-data" in capsys.readouterr().out
    _reset_accelerate()
    # another architecture: refused, without first saying that the run continues
    with pytest.raises(InpaintError):
        train(tiny(embedded, tmp_path / "run2", steps=4, captions=False, resume=True))
    assert "the run continues" not in capsys.readouterr().out


def test_captions_on_shards_without_captions_are_warned_about_once(tmp_path, monkeypatch, capsys):
    import conditioning
    from inpaint_cli import train as train_module

    monkeypatch.setattr(conditioning, "TextEncoder", CountingEncoder)
    monkeypatch.setattr(train_module, "CAPTION_CHECK_SAMPLES", 16)
    bare = write_square_shards(tmp_path / "bare", 16, 16, captions=False)
    train(tiny(bare, tmp_path / "run", steps=4, captions=True))
    warning = (
        "warning: no captions in the first 16 samples of --data; the caption path learns only "
        "the empty caption (--no-captions trains without it)"
    )
    assert capsys.readouterr().out.splitlines().count(warning) == 1
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    captioned = write_square_shards(tmp_path / "captioned", 16, 16)
    train(tiny(captioned, tmp_path / "run2", steps=4, captions=True))
    assert "no captions" not in capsys.readouterr().out
    # fine-tuning a captioned model on images without captions: no --no-captions hint, since
    # --init keeps the caption path (and --no-captions is refused for it)
    _reset_accelerate()
    train(tiny(bare, tmp_path / "run3", steps=4, captions=True, init=str(tmp_path / "run2/model")))
    lines = capsys.readouterr().out.splitlines()
    assert lines.count(warning.removesuffix(" (--no-captions trains without it)")) == 1


# ---- several processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_two_processes_on_uneven_shards(tmp_path):
    uneven = write_square_shards(tmp_path / "uneven", 40, 16)  # 3 shards: 16, 16, 8 samples
    out = tmp_path / "run"
    launcher = Path(sys.executable).with_name("accelerate")
    command = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "inpaint_cli.app",
        "train",
        "--data",
        uneven,
        "--val-data",
        uneven,
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--no-captions",
        "--num-workers",
        "0",
        "--val-every",
        "2",
        "--val-samples",
        "8",
        "--checkpoint-every",
        "2",
        "--warmup-steps",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["first_keys"] != ranks[1]["first_keys"]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["ema_sha256"] == ranks[1]["ema_sha256"]
    assert [r["step"] for r in log(out)] == [4]  # logs every 10 steps and at the end
    assert [r["step"] for r in log(out, "val.jsonl")] == [2, 4]
    assert log(out, "val.jsonl")[0]["samples"] == 8
    assert_every_checkpoint_complete(out)

    # both ranks resume from the checkpoint (each restores its own random state) and go on
    command[command.index("--steps") + 1] = "6"
    result = subprocess.run(
        command + ["--resume"], capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    run = json.loads((out / "run.json").read_text())
    assert run["resumes"][0]["world_size"] == 2 and run["resumes"][0]["step"] == 4
    assert assert_every_checkpoint_complete(out)[-1] == 6


def test_export_refuses_other_models_and_the_folders_of_any_training_run(tmp_path, shards):
    out = tmp_path / "run"
    train(tiny(shards, out, steps=1, checkpoint_every=1, val_data=shards, val_every=1))
    other = tmp_path / "other-run"  # another training run: its best/ and model/ are its own
    shutil.copytree(out, other)
    hf = tmp_path / "hf"  # a Hugging Face model: its config.json is not this project's
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    (hf / "model.safetensors").write_text("w")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[1, 2]")
    refused = {
        hf: "holds files but is not a model folder of inpaint (config.json: unknown config keys",
        broken: "holds files but is not a model folder of inpaint (config.json: not a JSON object",
        other / "best": f"the best/ folder of the training run {other}; choose another --out",
        other / "model": f"the model/ folder of the training run {other}; choose another --out",
    }

    def snapshot() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = snapshot()
    for target, problem in refused.items():
        result = CliRunner().invoke(app, ["export", str(out), "--out", str(target)])
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {target}: {problem}")
    assert snapshot() == before  # not one byte written anywhere

    # a model folder of this project is exported into again, whatever else it holds
    shutil.copytree(other / "model", tmp_path / "mine")
    (tmp_path / "mine" / "README.md").write_text("notes")
    assert export_model(out, tmp_path / "mine", step=1).name == "step-00000001"
    assert (tmp_path / "mine" / "README.md").read_text() == "notes"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_init_starts_from_a_model_folder_and_fine_tunes_it(tmp_path, monkeypatch):
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", CountingEncoder)
    data = write_square_shards(tmp_path / "data", 16, 16, embeddings=True)
    first = tmp_path / "first"
    overrides = {"norm": "group", "num_mixtures": 3}  # not the preset: the folder decides
    train(tiny(data, first, steps=3, captions=True, condition_all_layers=True,
               model_config=overrides))  # fmt: skip
    _reset_accelerate()
    exported = tmp_path / "exported"
    result = CliRunner().invoke(
        app, ["export", str(first), "--out", str(exported), "--caption-strength", "0.3"]
    )
    assert result.exit_code == 0, result.output
    start = ckpt.read_tensors(exported / "model.safetensors")
    _reset_accelerate()

    at_start = {}

    def after_backward(step, model):
        if step == 0:  # before the first update: the weights are the folder's
            at_start.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    tuned = tmp_path / "tuned"
    train(
        tiny(data, tuned, steps=3, captions=True, init=str(exported)),
        TrainHooks(after_backward=after_backward),
    )
    assert at_start.keys() == start.keys()
    assert all(torch.equal(at_start[k], start[k]) for k in start)
    config = json.loads((tuned / "model" / "config.json").read_text())
    assert config["norm"] == "group" and config["num_mixtures"] == 3
    assert config["condition_all_layers"] is True  # from the folder, not the flag's default
    assert config["caption_strength"] == 1.0  # training sees whole captions
    record = json.loads((tuned / "run.json").read_text())
    assert record["config"]["init"] == str(exported) and record["kl_warmup_steps"] == 0
    # the preset and the flag did not apply: not recorded as if they had
    assert record["config"]["preset"] is None and record["config"]["condition_all_layers"] is None
    after = ckpt.read_tensors(tuned / "model" / "model.safetensors")
    assert any(not torch.equal(after[k], start[k]) for k in start)  # it did train
    # a resume takes its weights from the checkpoint, and its architecture from run.json, not
    # from --init again: that folder may be gone or changed (a package upgrade's bundled model)
    shutil.rmtree(exported)
    _reset_accelerate()
    resumed = train(tiny(data, tuned, steps=4, captions=True, init=str(exported), resume=True))
    assert resumed["start_step"] == 3 and resumed["steps"] == 4
    config = json.loads((tuned / "model" / "config.json").read_text())
    assert config["norm"] == "group" and config["num_mixtures"] == 3


def test_a_resume_keeps_the_runs_kl_warmup_and_refuses_fewer_steps(tmp_path, shards):
    """A larger --steps re-planned the default warm-up: layers at KL weight 1 fell back to 0.1."""
    out = tmp_path / "run"
    train(tiny(shards, out, steps=100))
    warmup = json.loads((out / "run.json").read_text())["kl_warmup_steps"]
    assert warmup > 0 and log(out)[-1]["kl_weight_min"] == 1.0

    def stop_soon(step: int) -> None:
        if step == 101:
            os.kill(os.getpid(), signal.SIGTERM)

    _reset_accelerate()
    with pytest.raises(InpaintError) as stopped:  # a long continuation, stopped at step 102
        train(tiny(shards, out, steps=4000, resume=True), TrainHooks(after_step=stop_soon))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    rows = [row for row in log(out) if row["step"] > 100]
    assert rows and all(row["kl_weight_min"] == 1.0 for row in rows)
    record = json.loads((out / "run.json").read_text())
    assert record["kl_warmup_steps"] == warmup
    assert record["resumes"][-1]["kl_warmup_steps"] == warmup
    assert record["resumes"][-1]["config"]["steps"] == 4000  # each resume records its config
    _reset_accelerate()
    with pytest.raises(InpaintError) as caught:
        train(tiny(shards, out, steps=30, resume=True))
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "already at step 102" in message
    assert "not the steps to add" in message
    assert len(json.loads((out / "run.json").read_text())["resumes"]) == 1  # nothing recorded


def test_init_refuses_folders_that_do_not_fit_the_run(tmp_path, shards, monkeypatch):
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", CountingEncoder)
    plain = tmp_path / "plain"
    train(tiny(shards, plain, steps=1))  # no caption path
    _reset_accelerate()

    def refused(**overrides) -> str:
        with pytest.raises(InpaintError) as caught:
            train(tiny(shards, tmp_path / "run", steps=1, **overrides))
        _reset_accelerate()
        message = str(caught.value)
        assert "\n" not in message and caught.value.exit_code == 2
        assert not (tmp_path / "run").exists()  # refused before the run folder is made
        return message

    model = str(plain / "model")
    assert "has no caption path" in refused(init=model, captions=True)
    assert "drop --model-config" in refused(init=model, model_config={"norm": "group"})
    assert "not a model folder" in refused(init=str(tmp_path / "missing"))
    damaged = tmp_path / "damaged"
    shutil.copytree(plain / "model", damaged)
    (damaged / "config.json").write_text("{not json")
    assert refused(init=str(damaged)).startswith(f"{damaged / 'config.json'}: invalid model config")
    # weights of another architecture: named before anything is built from them
    config = json.loads((plain / "model" / "config.json").read_text())
    config["z_channels"] = 8
    (damaged / "config.json").write_text(json.dumps(config))
    message = refused(init=str(damaged))
    assert message.startswith(f"--init {damaged}: ") and "does not match" in message


def test_cli_init_bundled_names_the_bundled_model(tmp_path, shards):
    # the bundled model has a caption path, so --no-captions is refused before any training
    result = CliRunner().invoke(
        app,
        ["train", "--data", shards, "--out", str(tmp_path / "run"), "--no-captions",
         "--init", "bundled", "--num-workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "model/default: the model has a caption path" in result.output


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, shards, capsys):
    train(tiny(shards, tmp_path / "run", steps=4, warmup_steps=10, lr=1e-3))
    out = capsys.readouterr().out
    assert "warning: --warmup-steps 10 is not below --steps 4: the learning rate only reaches " \
        "0.0004, not --lr 0.001" in out  # fmt: skip
    assert log(tmp_path / "run")[-1]["lr"] == pytest.approx(4e-4)


def test_images_smaller_than_the_model_are_warned_about_once(tmp_path, shards, capsys):
    """Training enlarges them to the resolution without a word: a fine-tune learned blur."""
    small = tmp_path / "small"
    small.mkdir()
    with tarfile.open(small / "train-000000.tar", "w") as tar:
        for index in range(16):
            buffer = io.BytesIO()
            size = 8 if index % 2 else 16  # half of them half the tiny model's 16 px
            Image.new("RGB", (size, size), (index * 10, 0, 0)).save(buffer, "PNG")
            info = tarfile.TarInfo(f"sample{index:05d}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    train(tiny(str(small / "train-000000.tar"), tmp_path / "run", steps=3))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "enlarged" in line]
    assert len(warnings) == 1
    assert "are smaller than the model's 16 px and are enlarged to it (e.g. sample" in warnings[0]
    _reset_accelerate()
    train(tiny(shards, tmp_path / "large", steps=2))  # 16 px images: nothing to say
    assert "enlarged" not in capsys.readouterr().out


def test_images_seen_is_a_running_total_across_resumes(tmp_path, shards):
    """It was step x batch x the current process count: a resume on fewer processes (or a
    smaller batch) made the count go down."""
    out = tmp_path / "run"
    train(tiny(shards, out, steps=4, batch_size=8, checkpoint_every=2))
    assert log(out)[-1]["images_seen"] == 32
    _reset_accelerate()
    train(tiny(shards, out, steps=6, batch_size=4, resume=True))
    assert [row["images_seen"] for row in log(out)] == [8, 16, 24, 32, 36, 40]
    stale = out / "ranks" / "rank-1.json"  # left by an earlier session on two processes
    stale.write_text("{}")
    _reset_accelerate()
    train(tiny(shards, out, steps=7, batch_size=4, resume=True))
    assert not stale.exists() and (out / "ranks" / "rank-0.json").is_file()


def test_validation_does_not_depend_on_the_number_of_processes(tmp_path, shards):
    """Each rank took its own images and re-seeded the noise at its first batch: the same
    weights scored 7.14 bits/dim on one process and 6.61 on two."""
    from contextlib import nullcontext

    from inpaint_cli.train import validate
    from model.hvae import HVAE, preset_config

    class OneRankOf:
        def __init__(self, world: int, rank: int) -> None:
            self.num_processes, self.process_index, self.device = world, rank, torch.device("cpu")
            self.sums: torch.Tensor | None = None

        def autocast(self):
            return nullcontext()

        def reduce(self, tensor, reduction):
            self.sums = tensor.clone()  # the all-reduce adds the ranks' sums: done below
            return tensor

    torch.manual_seed(0)
    ema = HVAE(preset_config("tiny")).eval()
    config = tiny(shards, tmp_path / "unused", val_data=shards, val_samples=21, batch_size=4)

    def sums(world: int) -> torch.Tensor:
        total = torch.zeros(4 + ema.num_latent_layers, dtype=torch.float64)
        for rank in range(world):
            accelerator = OneRankOf(world, rank)
            validate(accelerator, ema, config, 16, None, "center", (0.1, 0.5))
            total += accelerator.sums
        return total

    one, two, three = sums(1), sums(2), sums(3)
    assert one[0] == two[0] == three[0] == 21  # exactly --val-samples, whatever the world
    assert torch.allclose(one, two) and torch.allclose(one, three)


def test_a_lost_peer_is_one_line_not_a_traceback(monkeypatch, capsys):
    import typer

    from inpaint_cli.app import _call

    def collective_fails():
        raise RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.1]:29500\nException raised from recvBytes at ..."
        )

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(typer.Exit) as stopped:
        _call(collective_fails)
    assert stopped.value.exit_code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another process of this job stopped" in err
    assert "inpaint train with --resume" in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, such an error is a bug: its traceback shows
    with pytest.raises(RuntimeError):
        _call(collective_fails)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        _call(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_a_stop_every_process_meets_is_said_once(monkeypatch, capsys):
    import typer

    from inpaint_cli.app import _call

    def stopped():
        raise InpaintError(
            "runs/x: stopped by SIGINT at step 4, which is checkpointed", 130, every_rank=True
        )

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(typer.Exit) as stop:
            _call(stopped)
        assert stop.value.exit_code == 130
        assert len(capsys.readouterr().err.splitlines()) == lines
    with pytest.raises(typer.Exit):  # a rank's own problem is always said
        _call(lambda: (_ for _ in ()).throw(InpaintError("x.png: corrupt", 1)))
    assert "x.png: corrupt" in capsys.readouterr().err
