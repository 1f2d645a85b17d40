"""embedscale: train text embedding models with exact large-batch contrastive learning.

The public names are imported lazily so that `embedscale.config` and the CLI stay fast to import
(config errors must surface before torch loads).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "BiEncoder": "embedscale.encoder.biencoder",
    "load_encoder": "embedscale.encoder.biencoder",
    "contrastive_loss": "embedscale.contrastive.losses",
    "export_model": "embedscale.export",
    "RetrievalEvaluator": "embedscale.retrieval.evaluator",
    "STSEvaluator": "embedscale.retrieval.evaluator",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'embedscale' has no attribute {name!r}")
