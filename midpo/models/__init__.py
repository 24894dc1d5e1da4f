"""Models: the prompt template per family, the tiny world tokenizer and base model, and the loader.

- :mod:`midpo.models.template`: ``PromptTemplate``, ``template_for`` (no heavy imports)
- :mod:`midpo.models.tokenizer`: ``train_world_tokenizer``, ``prepare_tokenizer`` (pad token, padding side)
- :mod:`midpo.models.tiny`: ``TinyBaseConfig``, ``build_tiny_base``, ``base_stage``
- :mod:`midpo.models.load`: ``load_model``, ``generate``

The names of the last two modules that need torch/transformers are resolved on first use (PEP 562), so
``import midpo.models`` stays cheap for the config and CLI.
"""

from __future__ import annotations

from typing import Any

from midpo.models.template import (
    ChatTemplate,
    PromptTemplate,
    WorldTemplate,
    template_for,
)
from midpo.models.tiny import TinyBaseConfig, base_stage, build_tiny_base

_LAZY = {
    "train_world_tokenizer": "midpo.models.tokenizer",
    "prepare_tokenizer": "midpo.models.tokenizer",
    "load_model": "midpo.models.load",
    "generate": "midpo.models.load",
}

__all__ = ["ChatTemplate", "PromptTemplate", "TinyBaseConfig", "WorldTemplate", "base_stage", "build_tiny_base", "template_for", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'midpo.models' has no attribute {name!r}")
