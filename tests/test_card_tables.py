"""examples/emoji/card_tables.py: the model card's by-source and model-vs-model tables."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "emoji" / "card_tables.py"


def _script():
    spec = importlib.util.spec_from_file_location("card_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(model_psnr, biharmonic_psnr, true_nll=None, empty_nll=None) -> dict:
    keys = [f"{'noto' if i % 3 else 'photo'}_{i}" for i in range(len(model_psnr))]
    n = len(keys)
    report = {
        "masks": "center",
        "psnr_cap_db": 100.0,
        "per_image": {
            "keys": keys,
            "iwae_bits_per_dim": [5.0] * n,
            "negative_elbo_bits_per_dim": [5.1] * n,
            "diversity": [0.02] * n,
            "methods": {
                "model, fill at T=0": {"psnr": list(model_psnr), "ssim": [0.5] * n},
                "model, mean of 8": {"psnr": list(model_psnr), "ssim": [0.5] * n},
                "biharmonic": {"psnr": list(biharmonic_psnr), "ssim": [0.5] * n},
            },
        },
    }
    if true_nll is not None:
        report["caption_ablation"] = {
            "per_image": {"keys": keys, "true": list(true_nll), "empty": list(empty_nll)}
        }
    return report


def test_source_tables_split_by_key_prefix_and_leave_out_exact_fills():
    script = _script()
    rng = np.random.default_rng(0)
    model = 20 + rng.normal(0, 0.1, 30)
    biharmonic = model - np.where(np.arange(30) % 3 == 0, 2.0, -1.0)  # photo +2 dB, noto -1 dB
    biharmonic[1] = 100.0  # an exact fill (capped) on one noto image
    true = np.full(30, 4.0)
    empty = true + np.where(np.arange(30) % 3 == 0, 0.05, 0.0)
    lines = script.source_tables(_report(model, biharmonic, true, empty))
    text = "\n".join(lines)
    assert any(line.startswith("| noto | 20 | -4.95") for line in lines)  # the exact fill counts
    assert "| photo | 10 | +2.00 [+2.00, +2.00] |" in lines
    # 10 photo images at +2 dB and the 19 noto ones left at -1 dB
    assert "without the 1 image biharmonic fills exactly: +0.03" in text
    assert "| photo | 10 | +0.050 [+0.050, +0.050] |" in text
    assert "| noto | 20 | +0.000 [+0.000, +0.000] |" in text


def test_paired_against_refuses_other_images_and_reports_new_minus_old(tmp_path):
    script = _script()
    old = _report([15.0] * 6, [14.0] * 6)
    new = _report([15.5] * 6, [14.0] * 6)
    lines = script.paired_against(new, old)
    assert "model, fill at T=0, psnr: +0.50 [+0.50, +0.50]" in lines
    assert "iwae_bits_per_dim: +0.0000 [+0.0000, +0.0000]" in lines
    other = _report([15.0] * 5, [14.0] * 5)
    for folder, report in (("new", new), ("other", other)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text(json.dumps(report))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "new"), str(tmp_path / "other")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "do not cover the same images" in result.stderr
    assert "| photo | 2 | +1.50" in result.stdout  # the new report's own tables came first
