"""Source architectures as descriptions (one module per family; the description and the registry in
:mod:`.base`). Adding a family is one module here that registers an :class:`Architecture`, and its tests
(docs/CONVERSION.md, "Adding an architecture")."""

from . import bert, gemma, gpt2, llama, olmo, olmo2, phi3, starcoder2  # noqa: F401  (each registers its model types)
from .base import (
    SITE_KINDS,
    Architecture,
    InputSite,
    Norm,
    ValueOutput,
    describe,
    lookup,
    register,
    registered,
    sliding_layers_from_config,
    supported_model_types,
)

__all__ = [
    "SITE_KINDS",
    "Architecture",
    "InputSite",
    "Norm",
    "ValueOutput",
    "describe",
    "lookup",
    "register",
    "registered",
    "sliding_layers_from_config",
    "supported_model_types",
]
