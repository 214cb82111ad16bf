"""Key mapping between original Wan-2.1 checkpoints and diffusers' ``WanTransformer3DModel``.

Research checkpoints of causal Wan models (Self Forcing, LongLive, CausVid) keep the module names of the original
``WanModel`` (``blocks.0.self_attn.q.weight``, ``head.modulation``, ...). This module renames them to the diffusers
layout, strips training wrappers (FSDP, ``torch.compile``, ``DataParallel``) and infers the model config from tensor
shapes.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "WRAPPER_TOKENS",
    "detect_key_format",
    "diffusers_to_original_key",
    "infer_wan_config",
    "original_to_diffusers_key",
    "convert_original_to_diffusers",
    "split_prefix",
    "strip_wrapper_tokens",
    "wan_config_keys",
]

# Inserted anywhere in a key by FSDP / activation checkpointing / torch.compile.
WRAPPER_TOKENS: tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

# Original Wan keys that are not weights (plain attributes saved by some forks); they are dropped.
IGNORED_ORIGINAL_KEYS: frozenset[str] = frozenset({"freqs"})

# Parameters that live directly on a module (not ``<module>.weight`` / ``<module>.bias``).
_TOP_PARAMS: dict[str, str] = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
_TOP_MODULES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    # image-conditioned (I2V / FLF2V) models
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_BLOCK_PARAMS: dict[str, str] = {"modulation": "scale_shift_table"}
_BLOCK_MODULES: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # Wan's ``norm3`` is the (affine) norm before cross-attention, diffusers calls it ``norm2`` and vice versa.
    "norm3": "norm2",
    "norm2": "norm3",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_PARAM_NAMES: tuple[str, ...] = ("weight", "bias")

ORIGINAL_ROOTS: frozenset[str] = frozenset(
    {"patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head", "img_emb", "freqs"}
)
DIFFUSERS_ROOTS: frozenset[str] = frozenset(
    {"patch_embedding", "condition_embedder", "blocks", "norm_out", "proj_out", "scale_shift_table", "rope"}
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _invert(mapping: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in mapping.items()}


_TOP_PARAMS_INV = _invert(_TOP_PARAMS)
_TOP_MODULES_INV = _invert(_TOP_MODULES)
_BLOCK_PARAMS_INV = _invert(_BLOCK_PARAMS)
_BLOCK_MODULES_INV = _invert(_BLOCK_MODULES)


def _rename(key: str, params: Mapping[str, str], modules: Mapping[str, str]) -> str | None:
    if key in params:
        return params[key]
    module, _, param = key.rpartition(".")
    if param in _PARAM_NAMES and module in modules:
        return f"{modules[module]}.{param}"
    return None


def _map_key(key: str, top: tuple[Mapping, Mapping], block: tuple[Mapping, Mapping]) -> str | None:
    match = _BLOCK_RE.match(key)
    if match is not None:
        renamed = _rename(match.group(2), *block)
        return None if renamed is None else f"blocks.{match.group(1)}.{renamed}"
    return _rename(key, *top)


def original_to_diffusers_key(key: str) -> str:
    """Rename one original Wan key (``blocks.0.self_attn.q.weight``) to diffusers (``blocks.0.attn1.to_q.weight``)."""
    renamed = _map_key(key, (_TOP_PARAMS, _TOP_MODULES), (_BLOCK_PARAMS, _BLOCK_MODULES))
    if renamed is None:
        raise KeyError(key)
    return renamed


def diffusers_to_original_key(key: str) -> str:
    """Inverse of :func:`original_to_diffusers_key`."""
    renamed = _map_key(key, (_TOP_PARAMS_INV, _TOP_MODULES_INV), (_BLOCK_PARAMS_INV, _BLOCK_MODULES_INV))
    if renamed is None:
        raise KeyError(key)
    return renamed


def _preview(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in total)" if len(keys) > limit else "")


def convert_original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole original-key state dict (prefix already stripped); unknown keys raise a ``ValueError``."""
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in IGNORED_ORIGINAL_KEYS:
            continue
        try:
            converted[original_to_diffusers_key(key)] = tensor
        except KeyError:
            unknown.append(key)
    if unknown:
        hint = ""
        if any(k.startswith(("vace_", "motion_encoder", "face_adapter")) for k in unknown):
            hint = " (VACE / Animate variants of Wan are not supported by this converter)"
        raise ValueError(f"checkpoint has keys that are not part of a Wan-2.1 transformer{hint}: {_preview(unknown)}")
    return converted


def strip_wrapper_tokens(key: str) -> str:
    """Remove FSDP / checkpoint-wrapper / ``torch.compile`` tokens from anywhere in a key."""
    for token in WRAPPER_TOKENS:
        key = key.replace(token, "")
    return key


def split_prefix(key: str, roots: Iterable[str] = ORIGINAL_ROOTS | DIFFUSERS_ROOTS) -> tuple[str, str] | None:
    """Split ``model.blocks.0.x`` into (``"model."``, ``"blocks.0.x"``): the prefix ends before the first root name.

    Returns ``None`` when no component of the key is a known root module name.
    """
    roots = frozenset(roots)
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in roots:
            return ".".join(parts[:i]) + ("." if i else ""), ".".join(parts[i:])
    return None


def detect_key_format(keys: Iterable[str]) -> str:
    """Return ``"original"`` or ``"diffusers"`` for a set of (prefix-free) Wan keys."""
    original = diffusers = False
    for key in keys:
        head = key.split(".", 1)[0]
        if head in ("text_embedding", "time_embedding", "time_projection", "head", "img_emb") or re.match(
            r"^blocks\.\d+\.(self_attn|cross_attn|modulation|ffn\.[02]\.)", key
        ):
            original = True
        elif head in ("condition_embedder", "proj_out", "scale_shift_table", "norm_out") or re.match(
            r"^blocks\.\d+\.(attn1|attn2|scale_shift_table|ffn\.net\.)", key
        ):
            diffusers = True
    if original and diffusers:
        raise ValueError("checkpoint mixes original Wan key names and diffusers key names; cannot convert it")
    if not (original or diffusers):
        raise ValueError("checkpoint does not look like a Wan transformer: no known Wan layer names were found")
    return "original" if original else "diffusers"


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"cannot infer the Wan config: the checkpoint has no tensor {key!r} (diffusers name)")
    return tuple(state_dict[key].shape)


def wan_config_keys() -> frozenset[str]:
    """Names of the ``WanTransformer3DModel.__init__`` arguments (the keys of its config)."""
    from diffusers import WanTransformer3DModel

    return frozenset(n for n in inspect.signature(WanTransformer3DModel.__init__).parameters if n != "self")


def infer_wan_config(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None) -> dict[str, Any]:
    """Infer ``WanTransformer3DModel`` init arguments from a diffusers-key state dict.

    Everything is read from tensor shapes except the number of attention heads, which defaults to Wan's head dim of
    128 (``heads = dim // 128``) unless ``num_attention_heads`` is given.
    """
    dim, in_channels, *patch_size = _shape(state_dict, "patch_embedding.weight")
    if len(patch_size) != 3:
        raise ValueError(f"'patch_embedding.weight' should be a 5-D Conv3d kernel, got {len(patch_size) + 2} dims")
    proj_out = _shape(state_dict, "proj_out.weight")[0]
    patch_volume = math.prod(patch_size)
    if proj_out % patch_volume:
        raise ValueError(f"'proj_out.weight' has {proj_out} rows, not a multiple of the patch volume {patch_volume}")

    block_ids = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
    if not block_ids:
        raise ValueError("cannot infer the Wan config: the checkpoint has no transformer blocks ('blocks.N.*')")
    if block_ids != list(range(len(block_ids))):
        missing = sorted(set(range(block_ids[-1] + 1)) - set(block_ids))
        raise ValueError(f"checkpoint blocks are not contiguous: block(s) {missing} are missing")

    if num_attention_heads is None:
        if dim % 128:
            raise ValueError(
                f"cannot infer num_attention_heads: hidden size {dim} is not a multiple of Wan's head dim 128; "
                "pass num_attention_heads (--num-attention-heads)"
            )
        num_attention_heads = dim // 128
    if num_attention_heads <= 0 or dim % num_attention_heads:
        raise ValueError(f"num_attention_heads={num_attention_heads} does not divide the hidden size {dim}")

    config: dict[str, Any] = {
        "patch_size": tuple(patch_size),
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": dim // num_attention_heads,
        "in_channels": in_channels,
        "out_channels": proj_out // patch_volume,
        "text_dim": _shape(state_dict, "condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": _shape(state_dict, "condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": _shape(state_dict, "blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": len(block_ids),
        "cross_attn_norm": "blocks.0.norm2.weight" in state_dict,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    if "condition_embedder.image_embedder.norm1.weight" in state_dict:
        config["image_dim"] = _shape(state_dict, "condition_embedder.image_embedder.norm1.weight")[0]
    if "blocks.0.attn2.add_k_proj.weight" in state_dict:
        config["added_kv_proj_dim"] = _shape(state_dict, "blocks.0.attn2.add_k_proj.weight")[1]
    if "condition_embedder.image_embedder.pos_embed" in state_dict:
        config["pos_embed_seq_len"] = _shape(state_dict, "condition_embedder.image_embedder.pos_embed")[1]
    return config
