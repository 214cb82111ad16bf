"""Utilities for diffusers-raven (offline tiny components for tests and demos)."""

from .tiny import (
    DEFAULT_CORPUS,
    DEFAULT_VOCAB,
    build_word_tokenizer,
    clean_prompt,
    encode_prompts,
    tiny_text_encoder,
    tiny_transformer,
    tiny_transformer_config,
    tiny_vae,
    tiny_wan_components,
)

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_VOCAB",
    "build_word_tokenizer",
    "clean_prompt",
    "encode_prompts",
    "tiny_text_encoder",
    "tiny_transformer",
    "tiny_transformer_config",
    "tiny_vae",
    "tiny_wan_components",
]
