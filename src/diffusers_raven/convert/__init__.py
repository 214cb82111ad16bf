"""Convert research checkpoints of causal Wan-2.1 models into diffusers model folders.

Self Forcing, LongLive and CausVid release ``.pt`` files (``torch.save`` dicts) whose transformer weights use the
original Wan key names, usually nested under ``generator`` / ``generator_ema`` / ``model`` and prefixed by training
wrappers. :func:`convert_checkpoint` unwraps them, optionally merges a LoRA (LongLive), renames the keys to the
diffusers layout, infers the config from tensor shapes and writes a ``save_pretrained`` folder.

Which nested entry is used (``key``):

* ``"auto"`` (default): ``generator_ema`` if present, else ``generator``, else ``model``, else the top level. An
  entry counts as present when it is a non-empty dict of tensors, or when the checkpoint is flat and has keys
  starting with ``"<name>."``.
* ``"generator"``, ``"generator_ema"``, ``"model"``: exactly that entry (an error if missing or empty).
* ``"none"``: the top level of the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .wan_keys import (
    DIFFUSERS_ROOTS,
    ORIGINAL_ROOTS,
    convert_original_to_diffusers,
    detect_key_format,
    diffusers_to_original_key,
    infer_wan_config,
    original_to_diffusers_key,
    split_prefix,
    strip_wrapper_tokens,
    wan_config_keys,
)

__all__ = [
    "AUTO_KEY_ORDER",
    "KEY_CHOICES",
    "ConversionReport",
    "add_convert_parser",
    "convert_checkpoint",
    "convert_checkpoint_with_report",
    "diffusers_to_original_key",
    "infer_wan_config",
    "load_checkpoint",
    "load_lora",
    "merge_lora",
    "normalize_state_dict",
    "original_to_diffusers_key",
    "run_convert",
    "select_state_dict",
]

logger = logging.getLogger(__name__)

KEY_CHOICES: tuple[str, ...] = ("auto", "generator", "generator_ema", "model", "none")
AUTO_KEY_ORDER: tuple[str, ...] = ("generator_ema", "generator", "model")
DTYPE_CHOICES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
CAUSAL_CLASS_NAME = "CausalWanTransformer3DModel"
DEFAULT_NUM_FRAMES_PER_CHUNK = 3
TOP_LEVEL = "(top level)"

_LORA_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_ALPHA_RE = re.compile(r"^(?P<module>.+)\.alpha$")
_META_ALPHA_NAMES = ("lora_alpha", "alpha", "ss_network_alpha")
_META_RANK_NAMES = ("lora_rank", "rank", "r", "ss_network_dim")
_META_CONFIG_NAMES = ("lora_config", "adapter_config", "config", "adapter")


# ----------------------------------------------------------------------------------------------------------- loading


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load a ``.pt`` / ``.pth`` / ``.safetensors`` file on the CPU.

    PyTorch files are read with ``weights_only=True`` (memory-mapped when possible); a file that pickles arbitrary
    Python objects is refused with a ``ValueError`` unless ``trust_pickle=True``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises several exception types
            raise ValueError(f"could not read checkpoint {path} as safetensors: {_first_line(err)}") from err
    weights_only = not trust_pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if weights_only and unsafe:
            raise ValueError(
                f"checkpoint {path} contains pickled Python objects ({unsafe.group(1)}) that "
                "torch.load(weights_only=True) refuses to load; if you trust the file's source, re-run with "
                "--trust-pickle (trust_pickle=True)"
            ) from err
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
        reason = detail.group(1).strip() if detail else _first_line(err)
        raise ValueError(
            f"could not read checkpoint {path}: the file is damaged or not a PyTorch checkpoint ({reason})"
        ) from err
    except Exception as err:  # a damaged file can make the unpickler fail in many ways
        raise ValueError(
            f"could not read checkpoint {path}: the file is damaged or not a PyTorch checkpoint ({_first_line(err)})"
        ) from err


def _as_mapping(obj: Any) -> Mapping | None:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    return obj if isinstance(obj, Mapping) else None


def _tensors(mapping: Mapping) -> dict[str, torch.Tensor]:
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _preview(keys: Any, limit: int = 8) -> str:
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in total)" if len(keys) > limit else "")


def _entry(obj: Mapping, name: str) -> dict[str, torch.Tensor] | None:
    """Tensors under ``obj[name]``, or under the flat keys ``"<name>.*"``; ``None`` when absent."""
    if name in obj:
        nested = _as_mapping(obj[name])
        return None if nested is None else _tensors(nested)
    prefix = f"{name}."
    flat = {k[len(prefix) :]: v for k, v in _tensors(obj).items() if k.startswith(prefix)}
    return flat or None


def select_state_dict(checkpoint: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the transformer state dict out of a loaded checkpoint; returns it and the entry name used."""
    key = "auto" if key is None else key
    if key not in KEY_CHOICES:
        raise ValueError(f"key must be one of {', '.join(KEY_CHOICES)}; got {key!r}")
    obj = _as_mapping(checkpoint)
    if obj is None:
        raise ValueError(f"checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors (a state dict)")
    if key == "auto":
        for name in AUTO_KEY_ORDER:
            entry = _entry(obj, name)
            if entry:
                return entry, name
    elif key != "none":
        entry = _entry(obj, key)
        if entry is None:
            raise ValueError(
                f"key={key!r}: the checkpoint has no entry {key!r}; its top-level entries are {_preview(obj)}"
            )
        if not entry:
            raise ValueError(f"key={key!r}: the checkpoint entry {key!r} holds no tensors")
        return entry, key
    tensors = _tensors(obj)
    if not tensors:
        nested = [k for k, v in obj.items() if _as_mapping(v) is not None]
        hint = f"; it has nested entries {_preview(nested)}: pick one with key/--key" if nested else ""
        raise ValueError(f"no tensors found at the top level of the checkpoint{hint}")
    return tensors, TOP_LEVEL


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, str]:
    """Strip wrappers and the common prefix, then rename to diffusers keys.

    Returns the diffusers-key state dict, the stripped prefix and the detected key format (``"original"`` or
    ``"diffusers"``).
    """
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for raw_key, tensor in state_dict.items():
        split = split_prefix(strip_wrapper_tokens(raw_key), ORIGINAL_ROOTS | DIFFUSERS_ROOTS)
        if split is None:
            unknown.append(raw_key)
            continue
        prefix, key = split
        bucket = by_prefix.setdefault(prefix, {})
        if key in bucket:
            raise ValueError(f"checkpoint has the key {key!r} twice (after removing wrapper prefixes)")
        bucket[key] = tensor
    if not by_prefix:
        raise ValueError(
            f"checkpoint does not look like a Wan transformer: none of its keys name a Wan layer ({_preview(unknown)})"
        )
    if len(by_prefix) > 1:
        found = ", ".join(f"{p!r} ({len(v)} tensors)" for p, v in sorted(by_prefix.items()))
        raise ValueError(f"checkpoint holds several models under different key prefixes: {found}; pick one with --key")
    if unknown:
        raise ValueError(f"checkpoint has keys that are not part of a Wan transformer: {_preview(unknown)}")
    prefix, stripped = next(iter(by_prefix.items()))
    key_format = detect_key_format(stripped)
    converted = convert_original_to_diffusers(stripped) if key_format == "original" else dict(stripped)
    return converted, prefix, key_format


# -------------------------------------------------------------------------------------------------------------- LoRA


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _lora_metadata(source: Any) -> dict[str, float]:
    """Read ``alpha`` / ``rank`` / ``use_rslora`` from a dict or config object when present."""
    meta: dict[str, float] = {}
    if source is None:
        return meta

    def get(name: str) -> Any:
        return source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)

    for target, names in (("alpha", _META_ALPHA_NAMES), ("rank", _META_RANK_NAMES)):
        for name in names:
            value = _number(get(name))
            if value is not None:
                meta[target] = value
                break
    if get("use_rslora") in (True, "true", "True"):
        meta["use_rslora"] = 1.0
    if get("use_dora") in (True, "true", "True"):
        raise ValueError("the LoRA uses DoRA (use_dora=True), which this converter cannot merge")
    if not meta:
        for name in _META_CONFIG_NAMES:
            nested = get(name)
            if nested is not None and not isinstance(nested, torch.Tensor):
                meta = _lora_metadata(nested)
                if meta:
                    break
    return meta


def _has_lora_keys(mapping: Mapping) -> bool:
    return any(isinstance(k, str) and _LORA_RE.match(k) for k in mapping)


def load_lora(path: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Load LoRA tensors and any ``alpha`` / ``rank`` metadata from a file or a peft adapter folder.

    Accepts a raw peft state dict (``...q.lora_A.weight``), LongLive's ``{"generator_lora": ...}`` layout, a
    ``.safetensors`` file (metadata is read from its header) or a folder with ``adapter_model.safetensors`` /
    ``adapter_model.bin`` and ``adapter_config.json``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    meta: dict[str, float] = {}
    if path.is_dir():
        config_file = path / "adapter_config.json"
        if config_file.is_file():
            meta = _lora_metadata(json.loads(config_file.read_text()))
        candidates = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise ValueError(f"lora: folder {path} has no adapter_model.safetensors or adapter_model.bin")
        path = weights
    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = {**_lora_metadata(handle.metadata() or {}), **meta}
    mapping = _as_mapping(obj)
    if mapping is None:
        raise ValueError(f"lora: {path} holds a {type(obj).__name__}, not a dict of tensors")
    container: Mapping = mapping
    if not _has_lora_keys(mapping):
        nested = {k: _as_mapping(v) for k, v in mapping.items() if _as_mapping(v) is not None}
        with_lora = [k for k, v in nested.items() if _has_lora_keys(v)]
        if "generator_lora" in with_lora:
            with_lora = ["generator_lora"]
        if not with_lora:
            raise ValueError(f"lora: no LoRA tensors (lora_A / lora_B weights) found in {path}")
        if len(with_lora) > 1:
            raise ValueError(f"lora: {path} holds several LoRA state dicts ({_preview(with_lora)}); keep only one")
        container = nested[with_lora[0]]
    file_meta = _lora_metadata(mapping)
    if container is not mapping:
        file_meta = {**file_meta, **_lora_metadata(container)}
    return _tensors(container), {**file_meta, **meta}


@dataclass
class LoraMergeInfo:
    """What :func:`merge_lora` did."""

    num_modules: int
    scales: set[float] = field(default_factory=set)
    alpha_source: str = "argument"


def _lora_target(module: str, base: Mapping[str, torch.Tensor], module_format: str) -> str:
    key = strip_wrapper_tokens(module)
    split = split_prefix(key, ORIGINAL_ROOTS | DIFFUSERS_ROOTS)
    if split is None:
        raise ValueError(f"lora: module {module!r} is not a Wan layer")
    key = split[1] + ".weight"
    if module_format == "original":
        try:
            key = original_to_diffusers_key(key)
        except KeyError:
            raise ValueError(f"lora: module {module!r} is not a Wan layer") from None
    if key not in base:
        raise ValueError(f"lora: module {module!r} has no weight {key!r} in the base checkpoint")
    return key


def merge_lora(
    state_dict: dict[str, torch.Tensor],
    lora_state_dict: Mapping[str, torch.Tensor],
    *,
    lora_alpha: float | None = None,
    lora_rank: int | None = None,
    metadata: Mapping[str, float] | None = None,
) -> LoraMergeInfo:
    """Merge LoRA weights into a diffusers-key state dict in place: ``W += scale * B @ A`` (computed in float32).

    ``scale = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA). The rank is read from the tensor shapes
    (``lora_rank`` only checks it); ``alpha`` is ``lora_alpha`` if given, else a per-module ``<module>.alpha``
    tensor, else the file's metadata, else the rank (scale 1, as in LongLive's released config). Merged weights
    are left in float32.
    """
    metadata = dict(metadata or {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    module_alpha: dict[str, float] = {}
    adapters: set[str] = set()
    other: list[str] = []
    for key, tensor in lora_state_dict.items():
        match = _LORA_RE.match(key)
        if match:
            kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(match["kind"], match["kind"])
            if match["adapter"]:
                adapters.add(match["adapter"])
            pairs.setdefault(match["module"], {})[kind] = tensor
        elif alpha_match := _LORA_ALPHA_RE.match(key):
            module_alpha[alpha_match["module"]] = float(tensor.item())
        else:
            other.append(key)
    if other:
        raise ValueError(f"lora: unsupported (non lora_A / lora_B) tensors in the LoRA file: {_preview(other)}")
    if not pairs:
        raise ValueError("lora: the LoRA file holds no lora_A / lora_B weights")
    if len(adapters) > 1:
        raise ValueError(f"lora: the LoRA file holds several adapters ({_preview(adapters)}); keep only one")
    if lora_rank is None and "rank" in metadata:
        lora_rank = int(metadata["rank"])
    if lora_alpha is not None and lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha}")

    names = [split_prefix(strip_wrapper_tokens(m), ORIGINAL_ROOTS | DIFFUSERS_ROOTS) for m in pairs]
    module_format = detect_key_format(s[1] + ".weight" for s in names if s is not None)
    info = LoraMergeInfo(num_modules=0)
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"lora: module {module!r} has {sorted(parts)} but needs both lora_A and lora_B")
        down, up = parts["lora_A"].float(), parts["lora_B"].float()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"lora: module {module!r} has incompatible shapes A {tuple(down.shape)} and B {tuple(up.shape)}"
            )
        rank = down.shape[0]
        if lora_rank is not None and lora_rank != rank:
            raise ValueError(f"lora_rank={lora_rank} does not match the rank {rank} of the LoRA tensors of {module!r}")
        if lora_alpha is not None:
            alpha, info.alpha_source = float(lora_alpha), "argument"
        elif module in module_alpha:
            alpha, info.alpha_source = module_alpha[module], "per-module alpha tensors"
        elif "alpha" in metadata:
            alpha, info.alpha_source = metadata["alpha"], "file metadata"
        else:
            alpha, info.alpha_source = float(rank), "default (alpha = rank)"
        scale = alpha / (math.sqrt(rank) if metadata.get("use_rslora") else rank)
        target = _lora_target(module, state_dict, module_format)
        weight = state_dict[target]
        if tuple(weight.shape) != (up.shape[0], down.shape[1]):
            raise ValueError(
                f"lora: module {module!r} (B @ A of shape {(up.shape[0], down.shape[1])}) does not match the base "
                f"weight {target!r} of shape {tuple(weight.shape)}"
            )
        state_dict[target] = weight.float() + scale * (up @ down)
        info.num_modules += 1
        info.scales.add(scale)
    if info.alpha_source.startswith("default"):
        logger.warning("No LoRA alpha given or found in the file: using alpha = rank (scale 1).")
    return info


# -------------------------------------------------------------------------------------------------------- conversion


@dataclass
class ConversionReport:
    """Summary of one conversion."""

    checkpoint: Path
    output_dir: Path
    source_key: str
    prefix: str
    key_format: str
    config: dict[str, Any]
    class_name: str
    dtype: torch.dtype
    num_tensors: int
    lora: LoraMergeInfo | None = None

    def summary(self) -> str:
        """A few human-readable lines."""
        c = self.config
        lines = [
            f"Converted {self.checkpoint} (entry {self.source_key}, key prefix {self.prefix!r}, "
            f"{self.key_format} Wan key names, {self.num_tensors} tensors) -> {self.output_dir}",
            f"  {self.class_name}: {c['num_layers']} layers, dim {c['num_attention_heads'] * c['attention_head_dim']} "
            f"({c['num_attention_heads']} heads x {c['attention_head_dim']}), ffn {c['ffn_dim']}, "
            f"in/out channels {c['in_channels']}/{c['out_channels']}, text_dim {c['text_dim']}, "
            f"patch {tuple(c['patch_size'])}, dtype {str(self.dtype).removeprefix('torch.')}",
        ]
        if "num_frames_per_chunk" in c:
            lines.append(f"  num_frames_per_chunk {c['num_frames_per_chunk']}")
        if self.lora is not None:
            scales = ", ".join(f"{s:g}" for s in sorted(self.lora.scales))
            lines.append(
                f"  merged LoRA into {self.lora.num_modules} layers (scale {scales}; alpha from {self.lora.alpha_source})"
            )
        return "\n".join(lines)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPE_CHOICES.values():
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype}")
        return dtype
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    return DTYPE_CHOICES[dtype]


def _dominant_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _build_config(
    state_dict: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None, causal: bool
) -> tuple[dict[str, Any], int | None]:
    """Infer the model config and apply overrides; returns (init kwargs, num_frames_per_chunk or None)."""
    overrides = dict(overrides or {})
    allowed = wan_config_keys() | {"num_frames_per_chunk"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"config_overrides: unknown config key(s) {unknown}; allowed: {sorted(allowed)}")
    chunk = overrides.pop("num_frames_per_chunk", DEFAULT_NUM_FRAMES_PER_CHUNK)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"num_frames_per_chunk must be a positive integer, got {chunk!r}")
    heads = overrides.pop("num_attention_heads", None)
    head_dim = overrides.pop("attention_head_dim", None)
    if heads is not None and (not isinstance(heads, int) or heads < 1):
        raise ValueError(f"num_attention_heads must be a positive integer, got {heads!r}")
    if heads is None and head_dim is not None:
        dim = state_dict["patch_embedding.weight"].shape[0] if "patch_embedding.weight" in state_dict else 0
        if not isinstance(head_dim, int) or head_dim < 1 or dim % head_dim:
            raise ValueError(f"attention_head_dim={head_dim!r} does not divide the hidden size {dim}")
        heads = dim // head_dim
    config = infer_wan_config(state_dict, num_attention_heads=heads)
    if head_dim is not None and head_dim != config["attention_head_dim"]:
        raise ValueError(
            f"attention_head_dim={head_dim} and num_attention_heads={heads} do not multiply to the hidden size "
            f"{heads * config['attention_head_dim']}"
        )
    config.update(overrides)
    return config, (chunk if causal else None)


def _write_folder(
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    output_dir: Path,
    *,
    class_name: str,
    num_frames_per_chunk: int | None,
    max_shard_size: int | str,
) -> None:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"the checkpoint's tensor shapes do not fit the inferred Wan config: {detail[:600]}") from err
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {_preview(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_preview(result.unexpected_keys)}")
        raise ValueError(f"the converted weights do not match WanTransformer3DModel: {'; '.join(parts)}")
    model.save_pretrained(output_dir, safe_serialization=True, max_shard_size=max_shard_size)
    config_path = output_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved["_class_name"] = class_name
    if num_frames_per_chunk is not None:
        saved["num_frames_per_chunk"] = num_frames_per_chunk
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def convert_checkpoint_with_report(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    key: str | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    lora_rank: int | None = None,
    dtype: str | torch.dtype | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    causal: bool = True,
    trust_pickle: bool = False,
    max_shard_size: int | str = "10GB",
) -> ConversionReport:
    """Like :func:`convert_checkpoint` but returns a :class:`ConversionReport`."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    target_dtype = _resolve_dtype(dtype)
    raw, source_key = select_state_dict(load_checkpoint(checkpoint, trust_pickle=trust_pickle), key)
    state_dict, prefix, key_format = normalize_state_dict(raw)
    del raw
    target_dtype = target_dtype or _dominant_dtype(state_dict)
    config, chunk = _build_config(state_dict, config_overrides, causal)

    lora_info = None
    if lora is not None:
        lora_tensors, lora_meta = load_lora(lora, trust_pickle=trust_pickle)
        lora_info = merge_lora(
            state_dict, lora_tensors, lora_alpha=lora_alpha, lora_rank=lora_rank, metadata=lora_meta
        )
    elif lora_alpha is not None or lora_rank is not None:
        raise ValueError("lora_alpha / lora_rank were given without a LoRA file (lora / --lora)")

    state_dict = {k: (v.to(target_dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    class_name = CAUSAL_CLASS_NAME if causal else "WanTransformer3DModel"
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_folder(
        state_dict,
        config,
        output_dir,
        class_name=class_name,
        num_frames_per_chunk=chunk,
        max_shard_size=max_shard_size,
    )
    if chunk is not None:
        config = {**config, "num_frames_per_chunk": chunk}
    return ConversionReport(
        checkpoint=checkpoint,
        output_dir=output_dir,
        source_key=source_key,
        prefix=prefix,
        key_format=key_format,
        config=config,
        class_name=class_name,
        dtype=target_dtype,
        num_tensors=len(state_dict),
        lora=lora_info,
    )


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    key: str | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: str | torch.dtype | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    causal: bool = True,
    lora_rank: int | None = None,
    trust_pickle: bool = False,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Convert a Self Forcing / LongLive / CausVid (or plain Wan-2.1) checkpoint into a diffusers folder.

    Args:
        checkpoint: ``.pt`` / ``.pth`` / ``.safetensors`` file.
        output_dir: folder to write ``config.json`` and ``diffusion_pytorch_model.safetensors`` into.
        key: which nested entry holds the weights: ``"auto"`` (or ``None``), ``"generator"``, ``"generator_ema"``,
            ``"model"`` or ``"none"`` (top level). ``auto`` picks ``generator_ema``, else ``generator``, else
            ``model``, else the top level.
        lora: optional LoRA file / peft adapter folder merged into the weights (``W += alpha / rank * B @ A``).
        lora_alpha: LoRA alpha; default: from the file, else equal to the rank.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default: the checkpoint's dtype.
        config_overrides: config values to force (e.g. ``num_attention_heads``, ``eps``, ``rope_max_seq_len``,
            ``num_frames_per_chunk``); everything else is inferred from tensor shapes.
        causal: write ``_class_name = "CausalWanTransformer3DModel"`` and ``num_frames_per_chunk`` (default 3)
            into ``config.json``; ``False`` writes a plain ``WanTransformer3DModel`` folder.
        lora_rank: optional check of the LoRA rank (it is read from the tensor shapes).
        trust_pickle: allow ``torch.load(weights_only=False)`` for files that pickle Python objects.
        max_shard_size: passed to ``save_pretrained``.

    Returns:
        The output folder.
    """
    report = convert_checkpoint_with_report(
        checkpoint,
        output_dir,
        key=key,
        lora=lora,
        lora_alpha=lora_alpha,
        lora_rank=lora_rank,
        dtype=dtype,
        config_overrides=config_overrides,
        causal=causal,
        trust_pickle=trust_pickle,
        max_shard_size=max_shard_size,
    )
    return report.output_dir


# --------------------------------------------------------------------------------------------------------------- CLI

_EPILOG = """\
examples:
  diffusers-raven convert --checkpoint self_forcing_dmd.pt --output self-forcing-1.3b --dtype bfloat16
  diffusers-raven convert --checkpoint longlive_base.pt --lora lora.pt --output longlive-1.3b --dtype bfloat16
  diffusers-raven convert --checkpoint causvid_model.pt --output causvid-1.3b

--key auto picks generator_ema if present, else generator, else model, else the top level of the file.
"""


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``convert`` sub-command on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a Self Forcing / LongLive / CausVid checkpoint into a diffusers folder",
        description="Convert a causal Wan-2.1 research checkpoint (original Wan key names) into a diffusers folder "
        "loadable with CausalWanTransformer3DModel.from_pretrained.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help=".pt / .pth / .safetensors checkpoint file")
    parser.add_argument("--output", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--key",
        choices=KEY_CHOICES,
        default="auto",
        help="entry of the checkpoint dict holding the weights (default: auto = generator_ema, else generator, "
        "else model, else the top level)",
    )
    parser.add_argument("--lora", type=Path, help="LoRA file or peft adapter folder to merge (e.g. LongLive)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: from the file, else equal to the rank)")
    parser.add_argument("--lora-rank", type=int, help="expected LoRA rank (checked against the tensor shapes)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--num-attention-heads", type=int, help="number of attention heads (default: hidden size // 128, as in Wan)"
    )
    parser.add_argument(
        "--num-frames-per-chunk",
        type=int,
        default=DEFAULT_NUM_FRAMES_PER_CHUNK,
        help=f"latent frames generated per autoregressive chunk (default: {DEFAULT_NUM_FRAMES_PER_CHUNK})",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load with torch.load(weights_only=False); only for files from a source you trust",
    )
    parser.add_argument(
        "--no-causal",
        dest="causal",
        action="store_false",
        help="write a plain WanTransformer3DModel folder instead of CausalWanTransformer3DModel",
    )
    parser.add_argument("--max-shard-size", default="10GB", help="largest safetensors shard (default: 10GB)")
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the ``convert`` sub-command; returns the exit code."""
    overrides: dict[str, Any] = {"num_frames_per_chunk": args.num_frames_per_chunk}
    if args.num_attention_heads is not None:
        overrides["num_attention_heads"] = args.num_attention_heads
    report = convert_checkpoint_with_report(
        args.checkpoint,
        args.output,
        key=args.key,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        lora_rank=args.lora_rank,
        dtype=args.dtype,
        config_overrides=overrides,
        causal=args.causal,
        trust_pickle=args.trust_pickle,
        max_shard_size=args.max_shard_size,
    )
    print(report.summary())
    return 0
