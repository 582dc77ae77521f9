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


def test_a_damaged_model_keeps_the_curves_but_exits_1(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    plots = tmp_path / "plots"
    code, lines = _report_lines(str(run), "--out", str(plots))
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'model' / 'model.safetensors'}")
    assert lines[0].endswith(f"; sample grid skipped (the curves are in {plots})")
    assert (plots / "loss.png").is_file() and (plots / "kl_per_layer.png").is_file()
    assert not (plots / "samples.png").exists()


def _train(config) -> None:
    """Train, then reset accelerate's process-wide state for the next run in this process."""
    from accelerate.state import AcceleratorState, GradientState

    train(config)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _copy_run(run_dir: Path, to: Path, **config: object) -> Path:
    """A copy of the run whose run.json config has `config` replaced (a downloaded run)."""
    import shutil

    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("plots"))
    record = json.loads((to / "run.json").read_text())
    record["config"].update(config)
    (to / "run.json").write_text(json.dumps(record))
    return to


@pytest.mark.parametrize(
    "spec",
    [
        "pipe:touch {marker}; cat {shard}",
        "{shard}::pipe:touch {marker}",  # a command after a real shard
        "https://example.invalid/val-{{000000..000001}}.tar",
        "-",  # stdin
    ],
)
def test_shards_that_run_json_names_as_commands_or_urls_are_never_opened(run_dir, tmp_path, spec):
    marker = tmp_path / "PWNED"
    shard = json.loads((run_dir / "run.json").read_text())["config"]["val_data"]
    spec = spec.format(marker=marker, shard=expand_shard(shard))
    run = _copy_run(run_dir, tmp_path / "downloaded", val_data=spec)
    plots = tmp_path / "plots"
    code, lines = _report_lines(str(run), "--out", str(plots))
    assert not marker.exists()
    assert code == 0
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {run / 'run.json'}: config.val_data names '")
    assert warnings[0].endswith(
        ", not a local shard file; a report never runs commands or opens URLs from a run "
        "folder; sample grid skipped"
    )
    assert sorted(set(lines) - set(warnings)) == [
        str(plots / "kl_per_layer.png"),
        str(plots / "loss.png"),
    ]
    assert not (plots / "samples.png").exists()


def expand_shard(pattern: str) -> str:
    from inpaint_cli.data import expand_urls

    return expand_urls(pattern)[0]


@pytest.mark.parametrize("name", ["loss.png", "kl_per_layer.png", "samples.png"])
def test_a_users_file_in_out_is_never_replaced(run_dir, tmp_path, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = tmp_path / "plots"
    plots.mkdir()
    plt.plot([1, 2, 3])  # the user's own matplotlib plot: matplotlib marks its PNGs too
    plt.savefig(plots / name)
    plt.close()
    before = (plots / name).read_bytes()
    code, lines = _report_lines(str(run_dir), "--out", str(plots))
    assert (code, lines) == (
        2,
        [
            f"error: {plots / name}: exists and is not from inpaint report; choose another --out "
            "or move it away"
        ],
    )
    assert (plots / name).read_bytes() == before
    assert sorted(path.name for path in plots.iterdir()) == [name]  # refused before plotting


def test_the_runs_own_plots_folder_is_replaced_even_untagged(run_dir):
    """Plots an older version wrote into RUN/plots carry no tag; that folder is report's own."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    Image.new("RGB", (3, 3)).save(plots / "loss.png")  # untagged, as older versions wrote it
    write_report(run_dir)
    with Image.open(plots / "loss.png") as image:
        assert image.size != (3, 3)


def test_a_report_replaces_its_own_earlier_plots(run_dir, tmp_path):
    plots = tmp_path / "plots"
    first = write_report(run_dir, plots)
    (plots / "loss.png").write_bytes((plots / "kl_per_layer.png").read_bytes())  # ours, stale
    assert write_report(run_dir, plots) == first
    with Image.open(plots / "loss.png") as image, Image.open(plots / "kl_per_layer.png") as other:
        assert image.size != other.size  # the loss plot again


def test_a_run_trained_from_a_relative_folder_reports_from_anywhere(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_square_shards(project / "shards", 12, 12)
    monkeypatch.chdir(project)
    pattern = "shards/train-000000.tar"  # relative, as typed on the command line
    config = tiny(pattern, Path("run"), steps=2, val_data=pattern, val_every=2, val_samples=6)
    _train(config)
    record = json.loads((project / "run" / "run.json").read_text())
    assert record["config"]["data"] == record["config"]["val_data"] == str(project / pattern)
    monkeypatch.chdir(elsewhere)
    assert project / "run" / "plots" / "samples.png" in write_report(project / "run")


def test_resuming_with_the_same_relative_command_changes_nothing(tmp_path, monkeypatch, capsys):
    write_square_shards(tmp_path / "shards", 12, 12)
    monkeypatch.chdir(tmp_path)
    pattern = "shards/train-000000.tar"
    _train(tiny(pattern, Path("run"), steps=2, val_data=pattern, checkpoint_every=2))
    capsys.readouterr()
    _train(tiny(pattern, Path("run"), steps=2, val_data=pattern, checkpoint_every=2, resume=True))
    assert "changed" not in capsys.readouterr().out  # the checkpoint keeps the spec as typed
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumes"]


def test_an_older_run_json_with_relative_shard_paths_still_reports(run_dir, tmp_path, monkeypatch):
    shard = Path(expand_shard(json.loads((run_dir / "run.json").read_text())["config"]["data"]))
    run = _copy_run(run_dir, tmp_path / "old", data=shard.name, val_data=shard.name)
    monkeypatch.chdir(shard.parent)  # read as written: from the folder training ran in
    assert run / "plots" / "samples.png" in write_report(run)


@pytest.mark.parametrize(
    "line",
    [
        '{"step": 3, "kl_bits_per_dim": 3.5}',
        '{"step": 3, "kl_bits_per_dim": ["x"]}',
        '{"step": 3, "skipped_updates": "2"}',
        '{"step": 3, "loss": 1' + "0" * 400 + "}",  # an int float() refuses
        '{"step": true}',
        '{"loss": 1.0}',
        "[1, 2]",
    ],
)
def test_log_lines_of_the_wrong_shape_are_skipped_with_a_warning(run_dir, tmp_path, line):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("plots"))
    records = (run / "train.jsonl").read_text().splitlines()
    (run / "train.jsonl").write_text("\n".join([records[0], line, *records[1:]]) + "\n")
    plots = tmp_path / "plots"
    code, lines = _report_lines(str(run), "--out", str(plots))  # never a traceback
    assert code == 0
    assert f"warning: {run / 'train.jsonl'}: 1 unreadable line skipped" in lines
    assert [r["step"] for r in read_jsonl(run / "train.jsonl")] == [
        json.loads(r)["step"] for r in records
    ]


def test_null_numbers_in_a_log_line_are_gaps_in_the_curves(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("plots"))
    records = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    records[1] |= {"skipped_updates": None, "loss": None, "kl_bits_per_dim": [None, 1.0]}
    (run / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(write_report(run, tmp_path / "plots")) == 3
    assert "warning" not in capsys.readouterr().err


def test_the_newest_resume_config_names_the_shards_to_sample():
    from inpaint_cli.report import latest_config

    first = {"val_data": "old/val-000000.tar"}
    resumed = {"val_data": "new/val-000000.tar"}
    assert latest_config({"config": first}) == first
    assert latest_config({"config": first, "resumes": [{"step": 5}]}) == first  # older records
    run = {"config": first, "resumes": [{"config": resumed}, {"step": 9, "config": "damaged"}]}
    assert latest_config(run) == resumed
    assert latest_config({"config": None}) == {}
