"""shards.py and `inpaint shards`: every source round-trips through shards and the loader."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from inpaint_cli import shards as shards_module
from inpaint_cli.app import app
from inpaint_cli.data import eval_loader, expand_urls
from inpaint_cli.errors import InpaintError
from inpaint_cli.shards import assign_split, parse_splits, write_shards


@pytest.fixture(autouse=True)
def _stable_width(monkeypatch):
    # rich and typer wrap at the terminal width; keep test output on single lines.
    monkeypatch.setenv("COLUMNS", "200")


def load_all(pattern: str, index_of, resolution: int = 8) -> dict[int, dict]:
    """Every sample of a split through the evaluation loader, keyed by image index."""
    found: dict[int, dict] = {}
    for batch in eval_loader(pattern, resolution, 4):
        assert batch["image"].shape[1:] == (3, resolution, resolution)
        assert batch["mask"].shape[1:] == (1, resolution, resolution)
        for row, caption in enumerate(batch["caption"]):
            pixel = ((batch["image"][row, :, 0, 0] + 1) * 127.5).round().int().tolist()
            index = index_of(pixel)
            assert index not in found, "a sample came out twice"
            found[index] = {"caption": caption, "key": batch["key"][row]}
    return found


def members(out) -> list[str]:
    names = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def sample_json(out, key: str) -> dict:
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            if f"{key}.json" in tar.getnames():
                return json.loads(tar.extractfile(f"{key}.json").read())
    raise KeyError(key)


@pytest.mark.parametrize("captions", ["metadata", "csv", "sidecar", "none"])
def test_folder_round_trip(tmp_path, make_image_folder, index_of, captions) -> None:
    rows = make_image_folder(tmp_path / "src", 7, captions=captions)
    summary = write_shards(tmp_path / "src", tmp_path / "out", max_count=3)
    train = summary["splits"]["train"]
    assert train["count"] == 7 and len(train["shards"]) == 3 and summary["skipped"] == 0
    found = load_all(train["pattern"], index_of)
    assert sorted(found) == list(range(7))
    for index, sample in found.items():
        assert sample["caption"] == rows[f"img_{index}.png"]["text"]
    if captions == "none":
        assert not any(name.endswith(".txt") for name in members(tmp_path / "out"))


def test_symlinked_folder_with_its_metadata_is_packed(tmp_path, make_image_folder, index_of):
    rows = make_image_folder(tmp_path / "disk" / "batch1", 3, captions="metadata")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "batch1").symlink_to(tmp_path / "disk" / "batch1", target_is_directory=True)
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    found = load_all(summary["splits"]["train"]["pattern"], index_of)
    assert sorted(found) == [0, 1, 2]
    assert {sample["caption"] for sample in found.values()} == {r["text"] for r in rows.values()}


def test_metadata_columns_are_kept_in_json(tmp_path, make_image_folder) -> None:
    make_image_folder(tmp_path / "src", 2, captions="metadata", concepts=2)
    write_shards(tmp_path / "src", tmp_path / "out")
    keys = {name.split(".")[0] for name in members(tmp_path / "out")}
    record = sample_json(tmp_path / "out", sorted(keys)[0])
    assert record["metadata"]["concept"] in {"concept0", "concept1"}
    assert record["source"] in {"img_0.png", "img_1.png"}
    assert (record["width"], record["height"], record["format"]) == (24, 20, "PNG")


def test_saved_hf_dataset_round_trip(tmp_path, index_of, png_sample) -> None:
    datasets = pytest.importorskip("datasets")

    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "words": datasets.Value("string"),
            "n": datasets.Value("int32"),
        }
    )
    rows = {
        "picture": [{"bytes": png_sample(i, (9, 9)), "path": None} for i in range(5)],
        "words": [f"words {i}" for i in range(5)],
        "n": list(range(5)),
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    summary = write_shards(
        tmp_path / "hf", tmp_path / "out", image_column="picture", text_column="words"
    )
    found = load_all(summary["splits"]["train"]["pattern"], index_of)
    assert {index: sample["caption"] for index, sample in found.items()} == {
        i: f"words {i}" for i in range(5)
    }
    record = sample_json(tmp_path / "out", found[3]["key"])
    assert record["metadata"] == {"n": 3}


def test_parquet_round_trip_with_named_columns(tmp_path, index_of, png_sample) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    for part in range(2):
        indices = range(part * 3, part * 3 + 3)
        table = pa.table(
            {
                "img": [{"bytes": png_sample(i, (5, 7)), "path": None} for i in indices],
                "alt": [None if i == 4 else f"alt {i}" for i in indices],
            }
        )
        pq.write_table(table, tmp_path / "pq" / f"part{part}.parquet")
    summary = write_shards(tmp_path / "pq", tmp_path / "out", image_column="img", text_column="alt")
    found = load_all(summary["splits"]["train"]["pattern"], index_of)
    assert {i: s["caption"] for i, s in found.items()} == {
        i: ("" if i == 4 else f"alt {i}") for i in range(6)
    }
    with pytest.raises(InpaintError, match="no column 'image'") as error:
        write_shards(tmp_path / "pq" / "part0.parquet", tmp_path / "out2")
    assert error.value.exit_code == 2
    # parquet in a symlinked sub-folder is found, as images are
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "pq").symlink_to(tmp_path / "pq", target_is_directory=True)
    summary = write_shards(tmp_path / "linked", tmp_path / "out3", image_column="img")
    assert summary["splits"]["train"]["count"] == 6


def test_split_keeps_concepts_apart(tmp_path, make_image_folder, index_of) -> None:
    rows = make_image_folder(tmp_path / "src", 48, captions="metadata", concepts=12)
    summary = write_shards(
        tmp_path / "src",
        tmp_path / "out",
        splits="train=0.5,val=0.25,test=0.25",
        split_by="concept",
        max_count=5,
    )
    concept_split: dict[str, str] = {}
    seen = 0
    for name, split in summary["splits"].items():
        if split["count"] == 0:
            assert split["shards"] == [] and split["pattern"] is None
            continue
        assert len(expand_urls(split["pattern"])) == len(split["shards"])
        found = load_all(split["pattern"], index_of)
        assert len(found) == split["count"]
        seen += len(found)
        for index in found:
            concept = rows[f"img_{index}.png"]["concept"]
            assert concept_split.setdefault(concept, name) == name, f"{concept} in two splits"
    assert seen == 48
    assert len(set(concept_split.values())) >= 2  # the hash really spreads concepts


def test_split_assignment_is_stable_and_follows_fractions() -> None:
    splits = parse_splits("a=0.7,b=0.3")
    names = [assign_split(f"group {i}", splits) for i in range(2000)]
    assert names == [assign_split(f"group {i}", splits) for i in range(2000)]
    assert 0.65 < names.count("a") / 2000 < 0.75
    for bad in ["train=0.9", "train=0.5,train=0.5", "a b=1", "train=x", "../x=1"]:
        with pytest.raises(InpaintError):
            parse_splits(bad)


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, make_image_folder, capsys) -> None:
    make_image_folder(tmp_path / "src", 3, captions="sidecar")
    (tmp_path / "src" / "empty.png").write_bytes(b"")
    (tmp_path / "src" / "text.jpg").write_text("not a jpeg")
    whole = (tmp_path / "src" / "img_0.png").read_bytes()
    (tmp_path / "src" / "cut.png").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "latin.png")
    (tmp_path / "src" / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert summary["skipped"] == 4
    assert summary["splits"]["train"]["count"] == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 4
    for name in ["empty.png", "text.jpg", "cut.png", "latin.txt"]:
        assert sum(name in line for line in warnings) == 1


def test_pictures_in_formats_it_does_not_read_are_warned_about_not_dropped(
    tmp_path, make_image_folder, capsys
) -> None:
    """A phone's HEIC photos were left out without a word (and shards said 0 bad files)."""
    make_image_folder(tmp_path / "src", 2, captions="none")
    (tmp_path / "src" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "src" / "notes.md").write_text("not a picture: not mentioned")
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "old.jpe", format="JPEG")
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert summary["skipped"] == 1 and summary["splits"]["train"]["count"] == 3  # .jpe is JPEG
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: {tmp_path / 'src' / 'IMG_0001.HEIC'}: .HEIC is not a format inpaint reads; "
        "convert it to PNG or JPEG"
    ]


def test_a_control_character_in_a_name_keeps_the_warning_on_one_line(
    tmp_path, make_image_folder, capsys
) -> None:
    make_image_folder(tmp_path / "src", 2, captions="none")
    bad = tmp_path / "src" / "evil\nwarning: forged.png"
    bad.write_text("not a png")
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert summary["skipped"] == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    shown = str(bad).replace("\n", "\\n")
    assert warnings == [
        f"warning: {shown}: not a supported image (PNG, JPEG, WebP, BMP, TIFF or GIF)"
    ]


def test_names_never_become_paths(tmp_path, make_image_folder) -> None:
    make_image_folder(tmp_path / "src", 2, captions="metadata")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    odd = tmp_path / "src" / "sub dir" / "a.b ü..png"
    odd.parent.mkdir()
    Image.new("RGB", (4, 4)).save(odd)
    with open(tmp_path / "src" / "metadata.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"file_name": "../outside.png", "text": "escape"}) + "\n")
        handle.write(json.dumps({"file_name": "/etc/passwd", "text": "absolute"}) + "\n")
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert summary["metadata_skipped"] == 2 and summary["skipped"] == 0
    assert summary["splits"]["train"]["count"] == 3
    for name in members(tmp_path / "out"):
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.(png|txt|json)", name), name
    captions = []
    for shard in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(n).read() for n in tar.getnames() if n.endswith(".txt")]
    assert b"escape" not in captions and b"absolute" not in captions


def test_output_rules(tmp_path, make_image_folder) -> None:
    make_image_folder(tmp_path / "src", 2)
    with pytest.raises(InpaintError, match="inside the input"):
        write_shards(tmp_path / "src", tmp_path / "src" / "shards")
    with pytest.raises(InpaintError, match="no such"):
        write_shards(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InpaintError, match="no images"):
        write_shards(tmp_path / "empty", tmp_path / "out")
    write_shards(tmp_path / "src", tmp_path / "out")
    with pytest.raises(InpaintError, match="already holds") as error:
        write_shards(tmp_path / "src", tmp_path / "out")
    assert error.value.exit_code == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["shards.json", "train-000000.tar"]


def interrupt_read(monkeypatch, at_call: int) -> tuple[list, object]:
    """Make the at_call-th image read raise KeyboardInterrupt (Ctrl-C); return (reads, real)."""
    real = shards_module._image_member
    reads: list[str] = []

    def reading(data, name, *rest):
        reads.append(name)
        if len(reads) == at_call:
            raise KeyboardInterrupt
        return real(data, name, *rest)

    monkeypatch.setattr(shards_module, "_image_member", reading)
    monkeypatch.setattr(shards_module, "_CHUNK", 1)  # write as it reads, as on a large folder
    return reads, real


def test_interrupted_run_keeps_complete_shards_and_resumes(
    tmp_path, make_image_folder, index_of, monkeypatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 9)
    interrupt_read(monkeypatch, 8)
    with pytest.raises(InpaintError) as error:
        write_shards(src, out, max_count=2)
    assert str(error.value) == (
        f"{out}: interrupted; 3 complete shards kept: run the same command again to resume"
    )
    assert error.value.exit_code == 130
    kept = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(os.listdir(out)) == [".shards-progress.json", *kept]  # no partial shard
    before = {name: (out / name).read_bytes() for name in kept}

    reads, _ = interrupt_read(monkeypatch, 0)
    summary = write_shards(src, out, max_count=2)
    assert len(reads) == 3  # only the images that no complete shard held
    assert summary["splits"]["train"]["count"] == 9
    assert summary["splits"]["train"]["shards"] == [*kept, "train-000003.tar", "train-000004.tar"]
    assert sorted(load_all(summary["splits"]["train"]["pattern"], index_of)) == list(range(9))
    assert {name: (out / name).read_bytes() for name in kept} == before
    assert not (out / ".shards-progress.json").exists()
    with pytest.raises(InpaintError, match="already holds shards"):  # finished: no resume
        write_shards(src, out, max_count=2)


@pytest.mark.parametrize("stop_at_record", [2, 4])  # the first shard's record, the third's
def test_a_shard_renamed_but_not_recorded_is_written_again(
    tmp_path, make_image_folder, index_of, monkeypatch, stop_at_record
) -> None:
    """A kill between a shard's rename and the record of it: the rerun replaces that shard."""
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 9)
    monkeypatch.setattr(shards_module, "_CHUNK", 1)
    real_write = shards_module.atomic_write_bytes
    records = []

    def killed_at_a_record(path, data):
        records.append(path)
        if len(records) == stop_at_record:  # the first record is written before any shard
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(shards_module, "atomic_write_bytes", killed_at_a_record)
    with pytest.raises(InpaintError) as error:
        write_shards(src, out, max_count=2)
    recorded = stop_at_record - 2
    assert str(error.value).startswith(f"{out}: interrupted; {recorded} complete shards kept")
    assert (out / f"train-{recorded:06d}.tar").exists()  # renamed, not recorded
    monkeypatch.setattr(shards_module, "atomic_write_bytes", real_write)
    summary = write_shards(src, out, max_count=2)
    assert summary["splits"]["train"]["count"] == 9
    assert sorted(load_all(summary["splits"]["train"]["pattern"], index_of)) == list(range(9))


def test_bad_files_before_an_interruption_still_count_after_resuming(
    tmp_path, make_image_folder, monkeypatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 10)
    quiet = lambda *_: None  # noqa: E731
    first = shards_module._source_items(src, "image", "text", None, quiet, quiet)[0]
    Path(first.name).write_bytes(b"not a png")  # the first image read: in a complete shard
    interrupt_read(monkeypatch, 10)
    command = ["shards", str(src), str(out), "--max-count", "2"]
    stopped = CliRunner().invoke(app, command)
    assert stopped.exit_code == 130
    assert stopped.output.strip().splitlines()[-1].startswith(f"error: {out}: interrupted; 3")
    reads, _ = interrupt_read(monkeypatch, 0)
    resumed = CliRunner().invoke(app, command)
    assert resumed.exit_code == 1  # one file was skipped, in the first run
    assert "resuming an interrupted run: complete shards kept (train 3), 1 bad files" in (
        resumed.output
    )
    assert "skipped: 1 bad files" in resumed.output
    assert first.name not in reads and len(reads) == 3
    assert json.loads((out / "shards.json").read_text())["splits"]["train"]["count"] == 9


def test_a_resume_with_other_settings_or_files_is_refused(
    tmp_path, make_image_folder, monkeypatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 9)
    interrupt_read(monkeypatch, 8)
    with pytest.raises(InpaintError, match="interrupted"):
        write_shards(src, out, max_count=2)
    listing = sorted(os.listdir(out))
    interrupt_read(monkeypatch, 0)
    with pytest.raises(InpaintError, match="another --max-count; run that command") as error:
        write_shards(src, out, max_count=3)
    assert error.value.exit_code == 2
    with pytest.raises(InpaintError, match="another --splits"):
        write_shards(src, out, max_count=2, splits="train=0.5,val=0.5")
    Image.new("RGB", (4, 4)).save(src / "new.png")
    with pytest.raises(InpaintError, match="another list of source files or captions"):
        write_shards(src, out, max_count=2)
    (src / "new.png").unlink()
    (out / ".shards-progress.json").write_text("{")
    with pytest.raises(InpaintError, match="damaged record of an interrupted run"):
        write_shards(src, out, max_count=2)
    assert sorted(os.listdir(out)) == listing  # nothing of the interrupted run was touched


def test_interrupted_parquet_run_resumes(tmp_path, index_of, png_sample, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    table = pa.table({"image": [{"bytes": png_sample(i, (5, 7)), "path": None} for i in range(7)]})
    pq.write_table(table, tmp_path / "pq" / "part.parquet")
    interrupt_read(monkeypatch, 6)
    with pytest.raises(InpaintError, match="2 complete shards kept"):
        write_shards(tmp_path / "pq", tmp_path / "out", max_count=2)
    reads, _ = interrupt_read(monkeypatch, 0)
    summary = write_shards(tmp_path / "pq", tmp_path / "out", max_count=2)
    assert len(reads) == 3
    assert sorted(load_all(summary["splits"]["train"]["pattern"], index_of)) == list(range(7))


def test_a_second_pack_into_the_same_folder_is_refused_while_one_runs(
    tmp_path, make_image_folder
) -> None:
    from inpaint_cli.images import output_lock

    make_image_folder(tmp_path / "src", 3)
    (tmp_path / "out").mkdir()
    with output_lock(tmp_path / "out", "shards"):  # as a running `inpaint shards` holds it
        with pytest.raises(InpaintError, match="another `inpaint shards` is writing") as error:
            write_shards(tmp_path / "src", tmp_path / "out")
    assert error.value.exit_code == 2
    assert os.listdir(tmp_path / "out") == []
    assert write_shards(tmp_path / "src", tmp_path / "out")["splits"]["train"]["count"] == 3


def test_resumed_embeddings_are_those_of_an_uninterrupted_run(
    tmp_path, make_image_folder, monkeypatch
) -> None:
    import conditioning

    class BatchSensitiveEncoder(FakeEncoder):
        """Like a real encoder, each row's last bits depend on what else is in its batch."""

        def encode(self, captions):
            rows = super().encode(captions)
            return rows + 1e-6 * sum(len(caption) for caption in captions)

    monkeypatch.setattr(conditioning, "TextEncoder", BatchSensitiveEncoder)
    make_image_folder(tmp_path / "src", 12, captions="sidecar")
    for index in range(12):  # captions of different lengths
        (tmp_path / "src" / f"img_{index}.txt").write_text("word " * index, encoding="utf-8")
    options = {"max_count": 2, "embed_captions": True, "splits": "train=0.7,val=0.3"}
    monkeypatch.setattr(shards_module, "_CHUNK", 4)
    write_shards(tmp_path / "src", tmp_path / "whole", **options)
    interrupt_read(monkeypatch, 7)
    monkeypatch.setattr(shards_module, "_CHUNK", 4)
    with pytest.raises(InpaintError, match="interrupted"):
        write_shards(tmp_path / "src", tmp_path / "resumed", **options)
    interrupt_read(monkeypatch, 0)
    monkeypatch.setattr(shards_module, "_CHUNK", 4)
    write_shards(tmp_path / "src", tmp_path / "resumed", **options)
    names = sorted(os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(tmp_path / "resumed")) == names
    for name in [name for name in names if name.endswith(".tar")]:
        assert (tmp_path / "resumed" / name).read_bytes() == (
            tmp_path / "whole" / name
        ).read_bytes()


def test_what_a_resume_accepts_and_refuses_as_a_change_of_source(
    tmp_path, make_image_folder, png_sample, monkeypatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def interrupted(src, out) -> None:
        interrupt_read(monkeypatch, 4)
        with pytest.raises(InpaintError, match="interrupted"):
            write_shards(src, out, max_count=2)
        interrupt_read(monkeypatch, 0)

    refused = "interrupted run with another list of source files or captions"
    make_image_folder(tmp_path / "src", 6, captions="metadata", concepts=2)
    interrupted(tmp_path / "src", tmp_path / "a")
    Image.new("RGB", (30, 30)).save(tmp_path / "src" / "img_5.png")  # other pixels, other size
    with pytest.raises(InpaintError, match=refused):
        write_shards(tmp_path / "src", tmp_path / "a", max_count=2)
    make_image_folder(tmp_path / "src2", 6, captions="metadata", concepts=2)
    interrupted(tmp_path / "src2", tmp_path / "b")
    metadata = tmp_path / "src2" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("concept1", "concept9"))  # not a caption
    with pytest.raises(InpaintError, match=refused):
        write_shards(tmp_path / "src2", tmp_path / "b", max_count=2)

    (tmp_path / "pq").mkdir()
    table = pa.table({"image": [{"bytes": png_sample(i), "path": None} for i in range(6)]})
    pq.write_table(table, tmp_path / "pq" / "part.parquet")
    interrupted(tmp_path / "pq", tmp_path / "c")
    (tmp_path / "pq" / "README.txt").write_text("notes")  # not data
    os.utime(tmp_path / "pq" / "part.parquet", (1, 1))  # copied without its times
    monkeypatch.chdir(tmp_path)
    summary = write_shards(Path("pq"), tmp_path / "c", max_count=2)  # spelled otherwise
    assert summary["splits"]["train"]["count"] == 6


def test_a_record_that_does_not_add_up_is_refused(tmp_path, make_image_folder, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 9)
    interrupt_read(monkeypatch, 8)
    with pytest.raises(InpaintError, match="3 complete shards kept"):
        write_shards(src, out, max_count=2)
    interrupt_read(monkeypatch, 0)
    path = out / ".shards-progress.json"
    good = json.loads(path.read_text())
    edits = {
        "through": lambda train: train.update(through=10**6),
        "shards": lambda train: train.update(shards=train["shards"][:1]),
        "samples": lambda train: train["shards"][0].update(samples=-5),
    }
    for edit in edits.values():
        record = json.loads(json.dumps(good))
        edit(record["splits"]["train"])
        path.write_text(json.dumps(record))
        with pytest.raises(InpaintError, match="damaged record of an interrupted run"):
            write_shards(src, out, max_count=2)
    path.write_text(json.dumps(good))
    with open(out / "train-000001.tar", "ab") as shard:
        shard.write(b"\0" * 512)
    with pytest.raises(InpaintError, match="train-000001.tar: missing or changed"):
        write_shards(src, out, max_count=2)


def test_a_finished_pack_is_named_as_such_and_stale_temporaries_go(
    tmp_path, make_image_folder
) -> None:
    make_image_folder(tmp_path / "src", 2)
    write_shards(tmp_path / "src", tmp_path / "out")
    with pytest.raises(InpaintError, match=r"already holds shards \(shards.json: a finished pack"):
        write_shards(tmp_path / "src", tmp_path / "out")
    (tmp_path / "again").mkdir()
    for stale in ["..shards-progress.json.0a1b2c3d.tmp", ".shards.json.0a1b2c3d.tmp"]:
        (tmp_path / "again" / stale).write_text("left by a kill -9")
    write_shards(tmp_path / "src", tmp_path / "again")
    assert sorted(os.listdir(tmp_path / "again")) == ["shards.json", "train-000000.tar"]


def test_disk_full_while_writing_is_one_clear_error(tmp_path, make_image_folder, monkeypatch):
    make_image_folder(tmp_path / "src", 3)

    real_replace = os.replace

    def no_space(source, destination):
        if str(source).endswith(".tar.tmp"):  # the shard, not the progress record
            raise OSError(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(shards_module.os, "replace", no_space)
    with pytest.raises(InpaintError) as error:
        write_shards(tmp_path / "src", tmp_path / "out")
    expected = f"{tmp_path / 'out'}: cannot write shards (No space left on device)"
    assert str(error.value) == expected
    assert os.listdir(tmp_path / "out") == []


class FakeEncoder:
    """Stands in for conditioning.TextEncoder: a deterministic 5-dim embedding per caption."""

    dim = 5

    def __init__(self, path=None, device="cpu", cache_size=100_000) -> None:
        self.path = path

    def encode(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([[len(c), c.count("1"), 0.5, -1.0, 2.0] for c in captions])

    def identity(self) -> dict:
        return {"name": "fake", "dim": self.dim, "weights_hash": "0" * 64}


def test_embed_captions_stores_raw_float32(tmp_path, make_image_folder, index_of, monkeypatch):
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", FakeEncoder)
    rows = make_image_folder(tmp_path / "src", 12, captions="metadata")
    summary = write_shards(tmp_path / "src", tmp_path / "out", embed_captions=True)
    assert summary["text_encoder"]["name"] == "fake"
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["text_encoder"]["dim"] == 5
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        name = next(n for n in tar.getnames() if n.endswith(".emb.f32"))
        assert len(tar.extractfile(name).read()) == 5 * 4
    for batch in eval_loader(summary["splits"]["train"]["pattern"], 8, 5):
        expected = FakeEncoder().encode(batch["caption"])
        assert batch["caption_embedding"].dtype == torch.float32
        assert torch.equal(batch["caption_embedding"], expected)
        for row in range(len(batch["key"])):
            pixel = ((batch["image"][row, :, 0, 0] + 1) * 127.5).round().int().tolist()
            assert batch["caption"][row] == rows[f"img_{index_of(pixel)}.png"]["text"]


def test_shards_command_prints_paste_ready_patterns(tmp_path, make_image_folder) -> None:
    make_image_folder(tmp_path / "src", 6, concepts=3, captions="metadata")
    result = CliRunner().invoke(
        app,
        [
            "shards",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--max-count",
            "1",
            "--splits",
            "train=0.5,val=0.5",
            "--split-by",
            "concept",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    total = 0
    for line in lines[:2]:
        match = re.fullmatch(r"(\w+): (\d+) samples in (\d+) shards?: --data (.+)", line)
        if match is None:
            assert re.fullmatch(r"\w+: 0 samples, no shards", line), line
            continue
        total += int(match[2])
        (pattern,) = shlex.split(match[4])  # quoted as a shell would need it
        assert len(expand_urls(pattern)) == int(match[3]) == int(match[2])
        assert all(os.path.isfile(url) for url in expand_urls(pattern))
    assert total == 6 and lines[-1] == "skipped: 0 bad files"
    bad = CliRunner().invoke(app, ["shards", str(tmp_path / "nope"), str(tmp_path / "o2")])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no such file or folder"
    ]


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from inpaint_cli.app import app\n"
        "for args in (['--help'], ['shards', '--help'], ['masks', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "    assert 'Usage' in result.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "heavy: []"
    # The real entry point too.
    shown = subprocess.run(
        [sys.executable, "-m", "inpaint_cli.app", "shards", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "--split-by" in shown.stdout


def test_usage_errors_are_one_line(tmp_path, capsys) -> None:
    from inpaint_cli.app import run_app

    cases = {
        ("run", str(tmp_path), "--out", str(tmp_path / "o")): "Missing option '--masks'",
        ("masks", str(tmp_path), str(tmp_path / "m"), "--seed", "x"): "--seed",
        ("shards", str(tmp_path), str(tmp_path / "s"), "--nope"): "No such option: --nope",
        ("bogus",): "No such command 'bogus'",
    }
    for args, problem in cases.items():
        assert run_app(list(args)) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: inpaint"), captured.err
        assert problem in lines[0] and "--help" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()
    # a bare `inpaint` still shows its help, and --help exits 0
    assert run_app([]) == 2 and "shards" in capsys.readouterr().out
    assert run_app(["masks", "--help"]) == 0 and "--kind" in capsys.readouterr().out


def test_non_png_images_are_reencoded_and_jpeg_kept(tmp_path, png_sample) -> None:
    src = tmp_path / "src"
    src.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(jpeg, "JPEG")
    (src / "photo.jpg").write_bytes(jpeg.getvalue())
    Image.open(io.BytesIO(png_sample(3))).save(src / "scan.tif")
    Image.open(io.BytesIO(png_sample(4))).save(src / "old.bmp")
    write_shards(src, tmp_path / "out")
    names = members(tmp_path / "out")
    assert sum(name.endswith(".jpg") for name in names) == 1
    assert sum(name.endswith(".png") for name in names) == 2
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        stored = next(n for n in tar.getnames() if n.endswith(".jpg"))
        assert tar.extractfile(stored).read() == jpeg.getvalue()  # bytes kept as they were


def test_a_file_of_several_frames_is_packed_with_one_note(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green")]
    frames[0].save(src / "blink.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(src / "pages.tif", save_all=True, append_images=frames[1:2])
    frames[0].save(src / "still.png")
    result = CliRunner().invoke(app, ["shards", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output  # a note, not a skipped file
    notes = sorted(line for line in result.stderr.splitlines() if line.strip())
    assert notes == [
        f"note: {src / 'blink.gif'}: 3 frames, training and evaluation use the first",
        f"note: {src / 'pages.tif'}: 2 frames, training and evaluation use the first",
    ]
    assert len(members(tmp_path / "out")) == 3 * 2  # image and json of each


def test_exit_code_is_1_when_files_are_skipped_and_metadata_lines_count_apart(
    tmp_path, make_image_folder
) -> None:
    bad = tmp_path / "allbad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"x")
    (bad / "b.jpg").write_bytes(b"")
    result = CliRunner().invoke(app, ["shards", str(bad), str(tmp_path / "o1")])
    assert result.exit_code == 1, result.output
    assert "train: 0 samples, no shards" in result.output
    assert "skipped: 2 bad files" in result.output

    src = tmp_path / "src"
    make_image_folder(src, 2, captions="metadata")
    with open(src / "metadata.jsonl", "a", encoding="utf-8") as handle:
        handle.write("not json\n[1, 2]\n" + json.dumps({"file_name": "gone.png"}) + "\n")
    summary = write_shards(src, tmp_path / "o2")
    assert summary["skipped"] == 0 and summary["metadata_skipped"] == 3
    result = CliRunner().invoke(app, ["shards", str(src), str(tmp_path / "o3")])
    assert result.exit_code == 0, result.output  # every image was packed
    assert "skipped: 0 bad files" in result.output
    assert "ignored: 3 metadata lines" in result.output

    (src / "cut.png").write_bytes((src / "img_0.png").read_bytes()[:20])
    result = CliRunner().invoke(app, ["shards", str(src), str(tmp_path / "o4")])
    assert result.exit_code == 1, result.output
    assert "skipped: 1 bad files" in result.output  # not 4: metadata lines are not files
    assert "train: 2 samples in 1 shard" in result.output  # the good ones are still written
    assert (tmp_path / "o4" / "train-000000.tar").is_file()


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_captions_with_unicode_line_separators_are_kept(tmp_path, kind, capsys) -> None:
    (tmp_path / "src").mkdir()
    captions = ["line one\u2028line two", "x\x85y", "a\x1cb"]
    for index in range(3):
        Image.new("RGB", (4, 4), (index, 0, 0)).save(tmp_path / "src" / f"a{index}.png")
    if kind == "jsonl":
        lines = [json.dumps({"file_name": f"a{i}.png", "text": c}, ensure_ascii=False)
                 for i, c in enumerate(captions)]  # fmt: skip
        lines.insert(2, "{broken")
        (tmp_path / "src" / "metadata.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    else:
        rows = "".join(f"a{i}.png,{c}\r\n" for i, c in enumerate(captions))
        (tmp_path / "src" / "metadata.csv").write_text(f"file_name,text\r\n{rows}", "utf-8")
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    found = {}
    with tarfile.open(tmp_path / "out" / summary["splits"]["train"]["shards"][0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".txt"):
                found[member.name] = tar.extractfile(member).read().decode("utf-8")
    assert sorted(found.values()) == sorted(captions)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    broken = f"warning: {tmp_path / 'src' / 'metadata.jsonl'} line 3: not a JSON object"
    assert warnings == ([broken] if kind == "jsonl" else [])


@pytest.mark.parametrize("captions", ["metadata", "csv", "sidecar"])
def test_captions_saved_with_a_byte_order_mark_are_read(
    tmp_path, make_image_folder, index_of, captions, capsys
) -> None:
    rows = make_image_folder(tmp_path / "src", 3, captions=captions)
    for path in (tmp_path / "src").glob("*.*"):
        if path.suffix in (".jsonl", ".csv", ".txt"):  # as Excel or Notepad save them
            path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8-sig")
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert "warning" not in capsys.readouterr().err
    found = load_all(summary["splits"]["train"]["pattern"], index_of)
    assert {index: sample["caption"] for index, sample in found.items()} == {
        index: rows[f"img_{index}.png"]["text"] for index in range(3)
    }


def test_disk_full_midway_prints_the_error_and_nothing_else(tmp_path, monkeypatch) -> None:
    import errno
    import gc

    (tmp_path / "src").mkdir()
    for index in range(9):  # noise: each PNG is larger than tarfile's 10 KiB write buffer
        Image.effect_noise((64, 64), 50 + index).save(tmp_path / "src" / f"noise_{index}.png")

    class FillingDisk(io.FileIO):
        """A shard file on a disk with room for 3000 bytes (all shards together)."""

        room = [3000]

        def write(self, data) -> int:
            if len(data) > self.room[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room[0] -= len(data)
            return super().write(data)

    monkeypatch.setattr(shards_module, "open", lambda name, mode: FillingDisk(name, "wb"), False)
    # tarfile's stream left open reports its failed flush through the unraisable hook
    # ("Exception ignored in: ... _Stream.__del__") when it is garbage-collected.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(InpaintError) as error:
        write_shards(tmp_path / "src", tmp_path / "out", max_count=3)
    assert str(error.value).endswith("cannot write shards (No space left on device)")
    del error
    gc.collect()
    assert unraisable == []
    assert os.listdir(tmp_path / "out") == []


def test_a_text_column_that_is_not_there_is_refused(tmp_path, make_image_folder, png_sample):
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    make_image_folder(tmp_path / "src", 2, captions="metadata")
    with pytest.raises(InpaintError) as error:
        write_shards(tmp_path / "src", tmp_path / "out", text_column="caption")
    assert error.value.exit_code == 2
    assert (
        str(error.value)
        == f"--text-column caption: no such column in {tmp_path / 'src'}'s metadata"
    )
    assert not (tmp_path / "out").exists()

    table = pa.table({"image": [{"bytes": png_sample(0), "path": None}], "text": ["a"]})
    pq.write_table(table, tmp_path / "one.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    for src in (tmp_path / "one.parquet", tmp_path / "hf"):
        with pytest.raises(InpaintError, match="no column 'caption' for --text-column") as error:
            write_shards(src, tmp_path / "out", text_column="caption")
        assert error.value.exit_code == 2
        assert not list((tmp_path / "out").glob("*.tar"))


def test_the_default_text_column_may_be_missing(tmp_path, make_image_folder, index_of) -> None:
    # Metadata for --split-by only, captions in sidecars: the documented fallback still works.
    rows = make_image_folder(tmp_path / "src", 3, captions="sidecar", concepts=2)
    lines = [
        json.dumps({"file_name": name, "concept": row["concept"]}) for name, row in rows.items()
    ]
    (tmp_path / "src" / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = write_shards(tmp_path / "src", tmp_path / "out", split_by="concept")
    found = load_all(summary["splits"]["train"]["pattern"], index_of)
    assert {i: s["caption"] for i, s in found.items()} == {
        i: f"caption number {i}" for i in range(3)
    }


def test_an_out_folder_holding_any_shards_is_refused(tmp_path, make_image_folder) -> None:
    make_image_folder(tmp_path / "src", 4)
    first = ["shards", str(tmp_path / "src"), str(tmp_path / "sh"), "--splits", "train=0.5,val=0.5"]
    assert CliRunner().invoke(app, first).exit_code == 0
    before = sorted(os.listdir(tmp_path / "sh"))
    again = CliRunner().invoke(
        app, ["shards", str(tmp_path / "src"), str(tmp_path / "sh"), "--splits", "test=1"]
    )
    assert again.exit_code == 2
    (line,) = again.output.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'sh'}: already holds shards")
    assert sorted(os.listdir(tmp_path / "sh")) == before  # no test split leaking the same images
    (tmp_path / "only-record").mkdir()
    (tmp_path / "only-record" / "shards.json").write_text("{}")
    with pytest.raises(InpaintError, match="already holds shards") as error:
        write_shards(tmp_path / "src", tmp_path / "only-record")
    assert error.value.exit_code == 2


def test_captions_that_are_not_text_are_skipped_with_a_warning(
    tmp_path, make_image_folder, index_of, capsys
) -> None:
    make_image_folder(tmp_path / "src", 6)
    values = [3, 2.5, True, {"a": 1}, [1], "words"]
    lines = [json.dumps({"file_name": f"img_{i}.png", "text": v}) for i, v in enumerate(values)]
    (tmp_path / "src" / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert summary["skipped"] == 0 and summary["metadata_skipped"] == 3
    found = load_all(summary["splits"]["train"]["pattern"], index_of)
    captions = {index: sample["caption"] for index, sample in found.items()}
    assert captions == {0: "3", 1: "2.5", 2: "", 3: "", 4: "", 5: "words"}
    warnings = capsys.readouterr().err.strip().splitlines()
    metadata = tmp_path / "src" / "metadata.jsonl"
    assert warnings == [
        f"warning: {metadata} line {line}: text is {kind}, not a caption; ignored"
        for line, kind in ((3, "a boolean"), (4, "an object"), (5, "a list"))
    ]


def test_a_source_file_too_large_is_skipped_before_it_is_read(
    tmp_path, make_image_folder, capsys, monkeypatch
) -> None:
    """A 6 GB (sparse) file was read whole: a MemoryError traceback stopped the pack."""
    import inpaint_cli.shards as shards_module

    make_image_folder(tmp_path / "src", 2, captions="none")
    with open(tmp_path / "src" / "huge.png", "wb") as handle:
        handle.truncate(3000)  # sparse: large on paper, nothing to read
    monkeypatch.setattr(shards_module, "MAX_SOURCE_BYTES", 2000)
    monkeypatch.setattr(Path, "read_bytes", _refuse_huge(Path.read_bytes))
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    assert summary["skipped"] == 1 and summary["splits"]["train"]["count"] == 2
    err = capsys.readouterr().err
    assert "huge.png: 0 MiB, above the 0 MiB an image file may have" in err


def _refuse_huge(read_bytes):
    def guarded(path: Path) -> bytes:
        assert path.name != "huge.png", "the oversized file was read"
        return read_bytes(path)

    return guarded


def test_repeated_and_non_utf8_metadata_lines_are_warned_about(
    tmp_path, make_image_folder, capsys
) -> None:
    """A repeated file_name was dropped silently; one non-UTF-8 byte stopped the whole pack."""
    src = tmp_path / "src"
    make_image_folder(src, 2, captions="none")
    rows = [
        json.dumps({"file_name": "img_0.png", "text": "one"}).encode(),
        json.dumps({"file_name": "img_0.png", "text": "two"}).encode(),
        b'{"file_name": "img_1.png", "text": "caf\xe9"}',  # Latin-1, not UTF-8
    ]
    (src / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    summary = write_shards(src, tmp_path / "out")
    assert summary["skipped"] == 0 and summary["metadata_skipped"] == 2
    err = capsys.readouterr().err
    assert f"{src / 'metadata.jsonl'} line 2: file_name 'img_0.png' is listed again" in err
    assert f"{src / 'metadata.jsonl'} line 3: not UTF-8 text" in err
    captions = {}
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".txt"):
                captions[member.name] = tar.extractfile(member).read().decode()
    assert list(captions.values()) == ["one"]  # the first row; img_1 has no caption
