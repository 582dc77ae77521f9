"""`inpaint eval`: classical baseline fills (known pixels untouched, smooth content filled
closely) and the evaluation job."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_tiny_model

from inpaint_cli.baselines import BASELINES, biharmonic_fill, mean_colour_fill
from inpaint_cli.metrics import hole_psnr


def _gradient_image(size: int = 32) -> np.ndarray:
    ramp = np.linspace(0, 255, size)
    red = np.tile(ramp, (size, 1))
    green = red.T
    blue = (red + green) / 2
    return np.round(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def _center_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return mask


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_known_pixels_are_exact_and_input_unchanged(name: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    mask = rng.random((24, 24)) < 0.3
    before = image.copy()
    filled = BASELINES[name](image, mask)
    assert filled.dtype == np.uint8 and filled.shape == image.shape
    np.testing.assert_array_equal(filled[~mask], image[~mask])
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_empty_and_full_holes_do_not_fail(name: str) -> None:
    image = _gradient_image(16)
    empty = np.zeros((16, 16), dtype=bool)
    np.testing.assert_array_equal(BASELINES[name](image, empty), image)
    filled = BASELINES[name](image, ~empty)
    assert filled.shape == image.shape


def test_mean_colour_fill_uses_known_pixels_only() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4] = (200, 100, 50)
    image[:, 4:] = (0, 0, 0)
    mask = np.zeros((8, 8), dtype=bool)
    mask[:, 4:] = True  # the black half is the hole, so only the coloured half is known
    filled = mean_colour_fill(image, mask)
    assert tuple(filled[0, 7]) == (200, 100, 50)


def test_biharmonic_fills_a_smooth_gradient_closely() -> None:
    image = _gradient_image()
    mask = _center_mask()
    assert hole_psnr(biharmonic_fill(image, mask), image, mask) > 40.0


def test_every_fill_beats_mean_colour_on_a_gradient() -> None:
    image = _gradient_image()
    mask = _center_mask()
    mean_score = hole_psnr(mean_colour_fill(image, mask), image, mask)
    for name, fill in BASELINES.items():
        if name != "mean-colour":
            assert hole_psnr(fill(image, mask), image, mask) > mean_score + 3.0, name


def test_rejects_wrong_inputs() -> None:
    with pytest.raises(ValueError):
        mean_colour_fill(np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError):
        biharmonic_fill(np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((4, 4), dtype=bool))


# ----------------------------------------------------------------------------- the eval job

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from inpaint_cli.errors import InpaintError  # noqa: E402
from inpaint_cli.evaluate import EvalOptions, derangement, evaluate  # noqa: E402

FAKE_ENCODER = {"name": "fake-encoder", "dim": 8, "weights_hash": "f" * 64}


def _save_tiny_model(folder: Path, **overrides: object) -> Path:
    random_tiny_model(**overrides).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def captioned_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_model(
        tmp_path_factory.mktemp("captioned"), caption_dim=8, text_encoder=FAKE_ENCODER
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(6):
        # 20x24: not the model's 16x16, so the folder path resizes and crops.
        pixels = np.clip(
            _gradient_image(24)[:20] + rng.integers(-20, 20, size=(20, 24, 3)), 0, 255
        ).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{index}.png")
        if index < 5:  # the last image has no caption
            rows.append({"file_name": f"img{index}.png", "text": f"a shape number {index % 3}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


class _FakeTextEncoder:
    """Stands in for conditioning.TextEncoder: a fixed random vector per caption."""

    identity_record = FAKE_ENCODER

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        self.name = self.identity_record["name"]
        self.dim = self.identity_record["dim"]

    def encode(self, captions: list[str]):  # noqa: ANN201
        import torch

        from inpaint_cli.masks import stable_seed

        rows = [
            np.random.default_rng(stable_seed(caption)).normal(size=self.dim)
            for caption in captions
        ]
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def identity(self) -> dict:
        return dict(self.identity_record)


def _options(data: Path, model: Path, out: Path, **changes: object) -> EvalOptions:
    options = EvalOptions(
        data=str(data), model=model, out=out, samples=3, batch_size=4, progress=False
    )
    options.bootstrap_resamples = 500
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def test_eval_writes_a_complete_report(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    from inpaint_cli.baselines import BASELINES

    out = tmp_path / "report"
    result = evaluate(_options(image_folder, tiny_model, out, baselines=True, masks="box"))
    assert result["images"] == 6 and result["resolution"] == 16
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"] == result["methods"]
    assert set(saved["methods"]) == {
        "model, fill at T=0",
        "model, 1 sample",
        "model, mean of 3",
        "model, best of 3",
        *BASELINES,
    }
    for scores in saved["methods"].values():
        assert 0 < scores["psnr"] <= 100 and -1 <= scores["ssim"] <= 1 and 0 <= scores["l1"] <= 1
    assert set(saved["median_psnr"]) == set(saved["methods"])
    assert all(0 < value <= 100 for value in saved["median_psnr"].values())
    assert "median hole PSNR" in (out / "metrics.md").read_text()
    one, best = saved["methods"]["model, 1 sample"], saved["methods"]["model, best of 3"]
    assert best["psnr"] >= one["psnr"] and best["l1"] <= one["l1"]
    nll = saved["nll"]
    assert nll["negative_elbo_bits_per_dim"] > 0 and nll["iwae_bits_per_dim"] > 0
    assert "upper bound" in nll["note"]
    assert saved["diversity"] > 0
    # Three model rows (the T=0 fill, one sample, mean of K) against each baseline, each metric
    # with an interval.
    assert len(saved["comparisons"]) == 3 * len(BASELINES)
    for row in saved["comparisons"]:
        for metric in ("psnr", "ssim", "l1"):
            interval = row[metric]
            assert interval["low"] <= interval["mean"] <= interval["high"]
    assert len(saved["per_image"]["keys"]) == 6
    markdown = (out / "metrics.md").read_text()
    assert "| telea |" in markdown and "upper bounds" in markdown
    page = (out / "index.html").read_text()
    assert 'src="examples.png"' in page and "<table>" in page
    assert "http://" not in page and "https://" not in page
    from PIL import Image

    with Image.open(out / "examples.png") as figure:
        assert figure.width > figure.height > 100
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_sample_scores_do_not_depend_on_the_batch_size(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    first = evaluate(_options(image_folder, tiny_model, tmp_path / "a", batch_size=2))
    second = evaluate(_options(image_folder, tiny_model, tmp_path / "b", batch_size=5))
    for method, scores in first["methods"].items():
        assert scores == pytest.approx(second["methods"][method], rel=1e-3), method
    assert first["diversity"] == pytest.approx(second["diversity"], rel=1e-3)


def test_the_temperature_0_fill_does_not_depend_on_the_seed_and_samples_do(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    first = evaluate(_options(image_folder, tiny_model, tmp_path / "a", seed=0))
    second = evaluate(_options(image_folder, tiny_model, tmp_path / "b", seed=1))
    one_fill = "model, fill at T=0"
    assert first["per_image"]["methods"][one_fill] == second["per_image"]["methods"][one_fill]
    samples = "model, 1 sample"
    assert first["per_image"]["methods"][samples] != second["per_image"]["methods"][samples]
    # at T=0 every sample would be that fill: the samples here were drawn at T=0.8
    assert first["methods"][samples]["psnr"] != first["methods"][one_fill]["psnr"]


def test_mask_folder_is_matched_by_stem_and_missing_masks_are_skipped(
    tiny_model: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    hole = np.zeros((20, 24), dtype=np.uint8)
    hole[6:14, 8:16] = 255
    Image.fromarray(hole).save(masks / "img0.png")
    Image.fromarray(hole).save(masks / "img1_mask.png")
    result = evaluate(_options(image_folder, tiny_model, tmp_path / "r", masks=str(masks)))
    assert result["images"] == 2 and result["skipped"] == 4
    assert result["per_image"]["keys"] == ["img0.png", "img1.png"]
    assert "img2.png: no mask found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"masks": "nonsense"}, "nonsense"),
        ({"data": "no/such/folder.tar"}, "no/such/folder.tar"),
        ({"model": Path("no/such/model")}, "no/such/model"),
        ({"samples": 0}, "--samples"),
        ({"data": "no/such/test-*.tar"}, "only brace patterns"),
    ],
)
def test_bad_options_are_one_line_usage_errors(
    tiny_model: Path, image_folder: Path, tmp_path: Path, changes: dict, expected: str
) -> None:
    options = _options(image_folder, tiny_model, tmp_path / "r")
    for name, value in changes.items():
        setattr(options, name, value)
    with pytest.raises(InpaintError) as error:
        evaluate(options)
    assert error.value.exit_code == 2
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "r").exists()


def test_caption_ablation_scores_true_empty_and_shuffled_captions(
    captioned_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", _FakeTextEncoder)
    result = evaluate(
        _options(image_folder, captioned_model, tmp_path / "r", caption_ablation=True)
    )
    ablation = result["caption_ablation"]
    assert ablation["images"] == 5  # the image without a caption is left out
    for gap in ("empty_minus_true", "shuffled_minus_empty", "shuffled_minus_true"):
        assert ablation[gap]["low"] <= ablation[gap]["mean"] <= ablation[gap]["high"]
    # Every condition is scored with the same noise, so a difference is the caption's doing:
    # the embeddings did reach the model.
    assert ablation["empty_minus_true"]["mean"] != 0.0
    assert ablation["shuffled_minus_true"]["mean"] != 0.0
    assert ablation["true_bits_per_dim"] == pytest.approx(
        ablation["empty_bits_per_dim"] - ablation["empty_minus_true"]["mean"]
    )
    assert "Caption ablation" in (tmp_path / "r" / "metrics.md").read_text()
    per_image = ablation["per_image"]
    assert len(per_image["keys"]) == len(per_image["captions"]) == 5
    assert all(per_image["captions"]) and set(per_image["keys"]) <= set(result["per_image"]["keys"])
    assert np.mean(per_image["true"]) == pytest.approx(ablation["true_bits_per_dim"])


def test_caption_strength_zero_makes_every_caption_the_empty_one(
    captioned_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import conditioning

    monkeypatch.setattr(conditioning, "TextEncoder", _FakeTextEncoder)
    result = evaluate(
        _options(
            image_folder, captioned_model, tmp_path / "r", caption_ablation=True,
            caption_strength=0.0,
        )
    )  # fmt: skip
    assert result["caption_strength"] == 0.0
    per_image = result["caption_ablation"]["per_image"]
    assert per_image["true"] == per_image["empty"] == per_image["shuffled"]
    assert "caption strength 0" in (tmp_path / "r" / "metrics.md").read_text()
    default = evaluate(
        _options(image_folder, captioned_model, tmp_path / "d", caption_ablation=True)
    )
    assert default["caption_strength"] == 1.0  # the model's config
    assert default["caption_ablation"]["per_image"]["true"] != per_image["true"]


def test_caption_ablation_refuses_another_text_encoder(
    captioned_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import conditioning

    class OtherEncoder(_FakeTextEncoder):
        identity_record = {**FAKE_ENCODER, "name": "other", "weights_hash": "0" * 64}

    monkeypatch.setattr(conditioning, "TextEncoder", OtherEncoder)
    with pytest.raises(InpaintError) as error:
        evaluate(_options(image_folder, captioned_model, tmp_path / "r", caption_ablation=True))
    assert error.value.exit_code == 2 and "trained with" in str(error.value)


def test_caption_ablation_needs_a_model_with_a_text_path(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(InpaintError) as error:
        evaluate(_options(image_folder, tiny_model, tmp_path / "r", caption_ablation=True))
    assert "no text path" in str(error.value) and error.value.exit_code == 2
    assert not (tmp_path / "r").exists()  # refused before any scoring


def test_derangement_moves_every_item_and_avoids_equal_labels() -> None:
    for seed in range(20):
        rng = np.random.default_rng(seed)
        order = derangement(7, rng)
        assert sorted(order) == list(range(7)) and all(order != np.arange(7))
        labels = ["a", "a", "a", "b", "b", "c", "c"]
        order = derangement(7, rng, labels)
        assert sorted(order) == list(range(7)) and all(order != np.arange(7))
        assert all(labels[order[i]] != labels[i] for i in range(7))
    with pytest.raises(ValueError):
        derangement(1, np.random.default_rng(0))


def test_eval_command_prints_the_summary(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    import shutil

    from typer.testing import CliRunner

    from inpaint_cli.app import app

    runner = CliRunner()
    args = ["eval", "--data", str(image_folder), "--model", str(tiny_model), "--samples", "2"]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    assert "hole PSNR" in ok.output and "upper bound" in ok.output
    bad = runner.invoke(app, [*args, "--masks", "nonsense", "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2
    assert "error: nonsense" in bad.output and "Traceback" not in bad.output
    box = [*args, "--masks", "box", "--hole-area", "0.6-0.7", "--limit", "2"]
    wide = runner.invoke(app, [*box, "--out", str(tmp_path / "w")])
    assert wide.exit_code == 0, wide.output
    holes = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert holes["hole_area"] == [0.6, 0.7] and "hole area 0.6-0.7" in wide.output
    assert all(0.6 * 0.99 <= f <= 0.7 for f in holes["per_image"]["hole_fraction"])
    area = runner.invoke(app, [*args, "--hole-area", "0.6-2", "--out", str(tmp_path / "a")])
    assert area.exit_code == 2 and area.output.strip().splitlines() == [
        "error: --hole-area 0.6-2: expected a range like 0.1-0.5 with 0 < low <= high <= 1"
    ]
    shutil.copytree(image_folder, tmp_path / "with-bad")
    (tmp_path / "with-bad" / "bad.png").write_bytes(b"not a png")
    args[2] = str(tmp_path / "with-bad")
    partial = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert partial.exit_code == 1  # scored the rest, but not everything
    assert "hole PSNR" in partial.output and "1 images skipped" in partial.output


def test_mask_folder_joins_several_named_masks_like_inpaint_run(tmp_path: Path) -> None:
    from PIL import Image

    from inpaint_cli.evaluate import _MaskFolder

    left, right = np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8)
    left[:, :2] = 255
    right[:, 6:] = 255
    Image.fromarray(left).save(tmp_path / "cat_mask_a.png")
    Image.fromarray(right).save(tmp_path / "cat_mask_b.png")
    hole = _MaskFolder(tmp_path).load("sub/cat.jpg", "cat", 16, 16)  # resized to the image
    assert hole.sum() == 2 * 16 * 4 and hole[:, :4].all() and hole[:, 12:].all()
    with pytest.raises(InpaintError):
        _MaskFolder(tmp_path).load("dog.jpg", "dog", 16, 16)


def test_shards_and_folder_give_the_same_images_and_baseline_scores(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    from inpaint_cli.baselines import BASELINES
    from inpaint_cli.shards import write_shards

    summary = write_shards(image_folder, tmp_path / "shards", max_count=4)
    pattern = summary["splits"]["train"]["pattern"]
    assert "{" in pattern  # two shards: the pattern path is exercised
    from_shards = evaluate(_options(pattern, tiny_model, tmp_path / "a", baselines=True))
    from_folder = evaluate(_options(image_folder, tiny_model, tmp_path / "b", baselines=True))
    assert from_shards["images"] == from_folder["images"] == 6
    # Same decoding, resizing and centre masks: the deterministic fills score the same.
    for name in BASELINES:
        assert from_shards["methods"][name] == pytest.approx(from_folder["methods"][name])
    limited = evaluate(_options(pattern, tiny_model, tmp_path / "c", limit=3))
    assert limited["images"] == 3


def test_one_sample_reports_no_mean_best_diversity_or_iwae(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    result = evaluate(_options(image_folder, tiny_model, tmp_path / "r", samples=1, limit=2))
    assert list(result["methods"]) == ["model, fill at T=0", "model, 1 sample"]
    assert result["diversity"] is None and result["nll"]["iwae_bits_per_dim"] is None
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["images"] == 2 and saved["nll"]["negative_elbo_bits_per_dim"] > 0


def test_limit_counts_only_images_that_decode(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    (folder / "a_bad.png").write_bytes(b"not a png")  # sorts first
    result = evaluate(_options(folder, tiny_model, tmp_path / "r", limit=1, samples=1))
    assert result["images"] == 1 and result["skipped"] == 1
    assert result["per_image"]["keys"] == ["img0.png"]


def test_shard_masks_are_found_by_the_packed_file_name_else_by_the_key(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from inpaint_cli.baselines import BASELINES
    from inpaint_cli.shards import safe_key, write_shards

    pattern = write_shards(image_folder, tmp_path / "shards")["splits"]["train"]["pattern"]
    masks = tmp_path / "masks"
    masks.mkdir()
    hole = np.zeros((20, 24), dtype=np.uint8)  # the images' size, off centre
    hole[2:10, 1:9] = 255
    Image.fromarray(hole).save(masks / "img0.png")
    Image.fromarray(hole).save(masks / "img1_mask.png")
    results = [
        evaluate(_options(data, tiny_model, tmp_path / name, masks=str(masks), baselines=True))
        for name, data in (("folder", image_folder), ("shards", pattern))
    ]
    assert [result["images"] for result in results] == [2, 2]
    assert [result["skipped"] for result in results] == [4, 4]
    # the same holes in the same places: the deterministic fills score the same
    for name in BASELINES:
        assert results[1]["methods"][name] == pytest.approx(results[0]["methods"][name])
    # a mask named after the sample's key (shards from elsewhere record no file name) still fits
    Image.fromarray(hole).save(masks / f"{safe_key('img2', 'img2.png')}.png")
    result = evaluate(_options(pattern, tiny_model, tmp_path / "keys", masks=str(masks)))
    assert result["images"] == 3


def test_an_image_file_is_not_taken_for_a_shard(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    options = _options(image_folder / "img0.png", tiny_model, tmp_path / "r")
    with pytest.raises(InpaintError) as error:
        evaluate(options)
    assert error.value.exit_code == 2
    assert (
        str(error.value)
        == f"{image_folder / 'img0.png'}: not a shard (tar file) nor an image folder"
    )
    assert not (tmp_path / "r").exists()


def test_out_may_not_replace_or_mix_with_the_users_files(
    tiny_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from typer.testing import CliRunner

    import inpaint_cli.evaluate as evaluate_module
    from inpaint_cli.app import app

    def no_scoring(*args: object) -> None:
        raise AssertionError("scored before refusing --out")

    monkeypatch.setattr(evaluate_module, "_score_batch", no_scoring)
    data = tmp_path / "dl"
    shutil.copytree(image_folder, data)
    shutil.copy(data / "img5.png", data / "examples.png")  # a picture of the user's
    masks = tmp_path / "masks"
    masks.mkdir()
    before = {path: path.read_bytes() for path in data.iterdir()}
    refused = {
        data: "the --data folder",
        data / "report": "the --data folder",
        masks: "the --masks folder",
        masks / "report": "the --masks folder",
    }
    for out, which in refused.items():
        with pytest.raises(InpaintError) as error:
            evaluate(_options(data, tiny_model, out, masks=str(masks)))
        assert error.value.exit_code == 2
        assert str(error.value) == (
            f"{out}: --out is or is inside {which}; the report would replace or mix with its "
            "files, choose another folder"
        )
    assert {path: path.read_bytes() for path in data.iterdir()} == before
    assert not (data / "report").exists() and not (masks / "report").exists()
    args = ["eval", "--data", str(data), "--model", str(tiny_model), "--out", str(data)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1

    # A folder holding a file named like a report file is refused unless an earlier
    # `inpaint eval` wrote it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text("my home page")
    with pytest.raises(InpaintError) as error:
        evaluate(_options(image_folder, tiny_model, other))
    assert error.value.exit_code == 2
    assert str(error.value) == (
        f"{other / 'index.html'}: exists and is not from inpaint eval; choose another --out "
        "or move it away"
    )
    assert (other / "index.html").read_text() == "my home page"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InpaintError, match="is a file, --out must be a folder"):
        evaluate(_options(image_folder, tiny_model, tmp_path / "file"))


def test_an_earlier_report_is_replaced(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    evaluate(_options(image_folder, tiny_model, out, samples=1, limit=2))
    evaluate(_options(image_folder, tiny_model, out, samples=1, limit=3))
    assert json.loads((out / "metrics.json").read_text())["images"] == 3


def test_warnings_are_one_line_each_when_stderr_is_not_a_terminal(
    tiny_model: Path,
    image_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # rich's width: 80 when not a terminal
    masks = tmp_path / ("a-mask-folder-with-a-long-name-" * 3)
    masks.mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.new("L", (24, 20), 255).save(masks / "img0.png")
    evaluate(_options(image_folder, tiny_model, tmp_path / "r", masks=str(masks), samples=1))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert f"warning: img1.png: no mask found in {masks}" in warnings
    assert all(line.startswith("warning: ") for line in warnings)


def _refuse_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    import inpaint_cli.evaluate as evaluate_module

    def no_scoring(*args: object) -> None:
        raise AssertionError("scored before refusing")

    monkeypatch.setattr(evaluate_module, "_score_batch", no_scoring)


def _uncaptioned_copy(image_folder: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(image_folder, folder, ignore=shutil.ignore_patterns("metadata.jsonl"))
    return folder


def test_a_mask_folder_inside_the_data_folder_is_never_read_as_images(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    import shutil

    from PIL import Image

    data = tmp_path / "photos"
    shutil.copytree(image_folder, data)
    masks = data / "masks"
    masks.mkdir()
    hole = np.zeros((20, 24), dtype=np.uint8)
    hole[6:14, 8:16] = 255
    for index in range(6):
        Image.fromarray(hole).save(masks / f"img{index}.png")
    for mask_kind in (str(masks), "center"):
        result = evaluate(_options(data, tiny_model, tmp_path / "r", masks=mask_kind, samples=1))
        # with --masks center nothing says photos/masks holds masks: its files are images,
        # as for `inpaint run` and `inpaint shards`
        expected = 6 if mask_kind != "center" else 12
        assert result["images"] == expected and result["skipped"] == 0
        assert (mask_kind == "center") == any(
            k.startswith("masks/") for k in result["per_image"]["keys"]
        )


def test_with_the_data_folder_as_mask_folder_an_image_is_no_ones_mask(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    import shutil

    from PIL import Image

    data = tmp_path / "photos"
    shutil.copytree(image_folder, data)
    hole = np.zeros((20, 24), dtype=np.uint8)
    hole[6:14, 8:16] = 255
    Image.fromarray(hole).save(data / "img0_mask.png")  # as `inpaint run` matches MASKS=IMAGES
    result = evaluate(_options(data, tiny_model, tmp_path / "r", masks=str(data), samples=1))
    assert result["per_image"]["keys"] == ["img0.png"] and result["skipped"] == 5


def test_an_out_folder_that_cannot_be_written_is_refused_before_scoring(
    tiny_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os
    import tempfile

    _refuse_scoring(monkeypatch)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "report"
    with pytest.raises(InpaintError) as error:
        evaluate(_options(image_folder, tiny_model, out))
    assert str(error.value) == f"{out}: cannot create folder (Not a directory)"
    assert error.value.exit_code == 1

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "read-only"
    with pytest.raises(InpaintError) as error:
        evaluate(_options(image_folder, tiny_model, out))
    assert str(error.value) == f"{out}: cannot write (Read-only file system)"
    assert error.value.exit_code == 1


def test_caption_ablation_on_a_folder_without_captions_is_refused_before_scoring(
    captioned_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_scoring(monkeypatch)
    data = _uncaptioned_copy(image_folder, tmp_path / "photos")
    (data / "img0.txt").write_text("a single caption")  # shuffling needs two
    out = tmp_path / "r"
    with pytest.raises(InpaintError) as error:
        evaluate(_options(data, captioned_model, out, caption_ablation=True))
    assert str(error.value) == (
        f"{data}: --caption-ablation needs at least two images with captions, found 1"
    )
    assert error.value.exit_code == 2 and not out.exists()


def test_caption_ablation_on_shards_without_captions_still_writes_the_report(
    captioned_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    from inpaint_cli.shards import write_shards

    data = _uncaptioned_copy(image_folder, tmp_path / "photos")
    pattern = write_shards(data, tmp_path / "shards")["splits"]["train"]["pattern"]
    out = tmp_path / "r"
    with pytest.raises(InpaintError) as error:
        evaluate(_options(pattern, captioned_model, out, caption_ablation=True, samples=1))
    assert error.value.exit_code == 2
    assert str(error.value) == (
        f"{pattern}: --caption-ablation needs at least two images with captions, found 0 "
        f"(the report without it: {out / 'index.html'})"
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["images"] == 6 and "caption_ablation" not in saved


def test_a_truncated_shard_is_counted_and_exits_1(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from inpaint_cli.app import app
    from inpaint_cli.shards import write_shards

    pattern = write_shards(image_folder, tmp_path / "shards")["splits"]["train"]["pattern"]
    whole = Path(pattern).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "r"
    args = ["eval", "--data", str(cut), "--model", str(tiny_model), "--samples", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert 0 < saved["images"] < 6
    assert saved["bad_shards"] == 1 and saved["skipped"] >= 1
    assert "1 truncated or unreadable shard)" in (out / "metrics.md").read_text()
    assert "truncated or unreadable shard" in result.output


def test_terminal_tables_keep_text_in_brackets(
    tiny_model: Path, image_folder: Path, tmp_path: Path
) -> None:
    import io

    from rich.console import Console

    from inpaint_cli.evaluate import print_summary

    result = evaluate(
        _options(image_folder, tiny_model, tmp_path / "r", baselines=True, samples=1, limit=3)
    )
    result["comparisons"][0]["psnr"] = {"mean": None, "low": None, "high": None}
    terminal = io.StringIO()
    print_summary(result, Console(file=terminal, width=300))
    text = terminal.getvalue()
    assert "mean [paired bootstrap 95% interval]; higher PSNR" in text
    assert "n/a [n/a, n/a]" in text


def test_mask_folder_sizes_and_holes_cut_away_are_named(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """eval stretched a mask of another size silently, and blamed a mask whose hole the centre
    crop had cut away for having none."""
    from PIL import Image

    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for name in ("wide", "other_size"):
        Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(
            data / f"{name}.png"
        )
    hole = np.zeros((20, 60), dtype=np.uint8)
    hole[5:15, 0:10] = 255  # at the left edge: outside the centred square
    Image.fromarray(hole).save(masks / "wide.png")
    middle = np.zeros((10, 30), dtype=np.uint8)
    middle[3:7, 12:18] = 255  # half the image's size, hole in the middle
    Image.fromarray(middle).save(masks / "other_size.png")

    with pytest.raises(InpaintError, match="no images with a hole to score"):
        evaluate(_options(str(data), tiny_model, tmp_path / "r", masks=str(masks)))
    err = capsys.readouterr().err
    assert "wide.png: the hole lies outside the centred square that eval scores" in err
    assert "no hole" not in err
    assert "mask is 30x10 but the image is 60x20 (use --resize-masks" in err
    resized = evaluate(
        _options(str(data), tiny_model, tmp_path / "r2", masks=str(masks), resize_masks=True)
    )
    assert resized["per_image"]["keys"] == ["other_size.png"] and resized["skipped"] == 1


def test_eval_under_a_launcher_is_refused(
    tiny_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process scored every image and wrote the same report files, unlocked."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InpaintError, match="runs as one process") as error:
        evaluate(_options(image_folder, tiny_model, tmp_path / "r"))
    assert error.value.exit_code == 2 and not (tmp_path / "r").exists()
