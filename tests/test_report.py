"""`inpaint report`: plots of a real (tiny) training run, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_train import CountingEncoder, tiny, write_square_shards
from typer.testing import CliRunner

from inpaint_cli.app import app
from inpaint_cli.errors import InpaintError
from inpaint_cli.report import layer_labels, read_jsonl, write_report
from inpaint_cli.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    shards = write_square_shards(root / "shards", 24, 12)
    out = root / "run"
    train(tiny(shards, out, steps=6, val_data=shards, val_every=3, val_samples=8))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def test_report_writes_loss_kl_and_sample_plots(run_dir, tmp_path):
    out = tmp_path / "plots"
    written = write_report(run_dir, out)
    assert [path.name for path in written] == ["loss.png", "kl_per_layer.png", "samples.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temps


def test_loss_plot_gains_a_fill_psnr_panel_when_validation_scored_the_fill(run_dir, tmp_path):
    import shutil

    assert all("fill_psnr_db" in record for record in read_jsonl(run_dir / "val.jsonl"))
    older = tmp_path / "older-run"  # as written before validation scored the fill
    shutil.copytree(run_dir, older)
    records = [
        {k: v for k, v in record.items() if k != "fill_psnr_db"}
        for record in read_jsonl(run_dir / "val.jsonl")
    ]
    (older / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    heights = []
    for folder in (run_dir, older):
        write_report(folder, tmp_path / folder.name)
        with Image.open(tmp_path / folder.name / "loss.png") as image:
            heights.append(image.size[1])
    assert heights[0] > heights[1] * 1.3  # three panels against two


def test_report_defaults_to_the_run_folder_and_runs_from_the_cli(run_dir):
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "plots" / "samples.png").is_file()
    assert "loss.png" in result.output


def test_report_of_a_captioned_model(tmp_path, monkeypatch):
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", CountingEncoder)
    shards = write_square_shards(tmp_path / "shards", 12, 12, embeddings=True)
    out = tmp_path / "run"
    train(tiny(shards, out, steps=2, captions=True, val_data=shards, val_every=2, val_samples=6))
    written = write_report(out)
    assert (out / "plots" / "samples.png") in written


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(InpaintError, match="train.jsonl"):
        write_report(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no such run folder"
    ]


def test_logs_cut_by_a_kill_are_read_up_to_the_cut(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_records_a_resumed_run_superseded_are_dropped(tmp_path):
    # killed after step 30 with its last checkpoint at step 20: the resumed run logs 30 again
    path = tmp_path / "train.jsonl"
    logged = [(10, 5.0), (20, 4.0), (30, 9.0), (40, 9.5), (30, 3.5), (40, 3.0)]
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in logged))
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [
        (10, 5.0),
        (20, 4.0),
        (30, 3.5),
        (40, 3.0),
    ]


def test_layer_labels_follow_the_top_down_order():
    config = {"latent_groups": {"8": 1, "1": 1, "4": 2}}
    assert layer_labels(config, 4) == ["1x1 #1", "4x4 #1", "4x4 #2", "8x8 #1"]
    assert layer_labels(config, 3) == ["layer 0", "layer 1", "layer 2"]


def _report_lines(*arguments: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["report", *arguments])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )  # never a traceback
    return result.exit_code, result.output.strip().splitlines()


def test_damaged_run_files_give_one_line_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.jsonl").write_bytes(b"\xff\xfe")
    assert _report_lines(str(run)) == (
        2,
        [f"error: {run}: no train.jsonl records (not an `inpaint train` run?)"],
    )
    (run / "train.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "run.json").write_text("[]")
    assert _report_lines(str(run)) == (
        1,
        [f"error: {run / 'run.json'}: not a run record of `inpaint train`"],
    )
    image = tmp_path / "file.png"
    Image.new("RGB", (4, 4)).save(image)
    assert _report_lines(str(image)) == (2, [f"error: {image}: not a run folder"])


def test_undecodable_log_lines_are_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    good = [json.dumps({"step": step, "loss": 1.0}).encode() for step in (1, 2)]
    path.write_bytes(good[0] + b"\n\xff\xfe\n" + good[1] + b"\n")
    assert [record["step"] for record in read_jsonl(path)] == [1, 2]
    assert capsys.readouterr().err == f"warning: {path}: 1 unreadable line skipped\n"


def test_a_damaged_model_skips_only_the_sample_grid(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    code, lines = _report_lines(str(run), "--out", str(tmp_path / "plots"))
    assert code == 0
    assert lines[:2] == [
        str(tmp_path / "plots" / name) for name in ("loss.png", "kl_per_layer.png")
    ]
    assert len(lines) == 3 and lines[2].startswith(
        f"warning: {run / 'model' / 'model.safetensors'}"
    )
    assert lines[2].endswith("; sample grid skipped")
    assert not (tmp_path / "plots" / "samples.png").exists()
