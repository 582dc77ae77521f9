"""Caption conditioning: frozen text encoders that turn captions into embeddings.

Knows nothing of `model` or `inpaint_cli`: the training job joins the encoder's output to the
model. transformers is imported only when an encoder is built.
"""

from conditioning.text import (
    DEFAULT_PACKAGE,
    INSTALL_HINT,
    TextEncoder,
    TextEncoderError,
    check_encoder_fits,
    check_same_encoder,
    default_encoder_path,
    weights_sha256,
)

__all__ = [
    "DEFAULT_PACKAGE",
    "INSTALL_HINT",
    "TextEncoder",
    "TextEncoderError",
    "check_encoder_fits",
    "check_same_encoder",
    "default_encoder_path",
    "weights_sha256",
]
