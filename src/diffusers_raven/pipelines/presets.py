"""Default models: where the bundled model lives and how a ``--model`` string becomes a pipeline.

The package ships a small model trained on ShapesWorld in ``diffusers_raven/assets/shapesworld`` (built by the recipes of
``docs/experiments/shapesworld/shapes_model_chain.md``). If that folder is missing (a trimmed install), the default
falls back to a randomly initialised tiny pipeline (deterministic, offline, noise-like output), and
:func:`resolve_model` reports that so that callers can say so.

``model`` strings understood by :func:`load_pipeline`:

* ``None`` or ``"bundled"``: the bundled model if present, else the random tiny pipeline;
* ``"random-tiny"``: the random tiny pipeline;
* a path to an existing folder: ``CausalVideoPipeline.from_pretrained(folder)``;
* a path-like string (``./x``, ``../x``, ``/x``, ``~/x``, ``C:\\x``) that does not exist: ``FileNotFoundError``;
* anything else: a Hub repository id (``owner/name``), loaded with ``CausalVideoPipeline.from_pretrained``.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import diffusers_raven

from ..models import CausalWanTransformer3DModel
from ..schedulers import ConsistencyFlowMatchScheduler
from ..utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_transformer_config, tiny_vae
from .pipeline_causal_video import CausalVideoPipeline

__all__ = [
    "BUNDLED_MODEL_DIR",
    "DEFAULT_MODEL",
    "RANDOM_TINY",
    "ResolvedModel",
    "bundled_model_available",
    "load_pipeline",
    "random_tiny_pipeline",
    "resolve_model",
]

#: Where the bundled ShapesWorld model lives inside the package.
BUNDLED_MODEL_DIR: Path = Path(diffusers_raven.__file__).parent / "assets" / "shapesworld"
#: The ``model`` name of the default model.
DEFAULT_MODEL = "bundled"
#: The ``model`` name of the randomly initialised tiny pipeline.
RANDOM_TINY = "random-tiny"

# A Hub repository id: ``name`` or ``owner/name`` with letters, digits, ``-``, ``_`` and ``.``.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ResolvedModel:
    """What a ``model`` string refers to.

    Attributes:
        kind: ``"bundled"``, ``"random-tiny"``, ``"local"`` or ``"hub"``.
        location: the folder (bundled / local), the repository id (hub) or ``None`` (random tiny).
        fallback: ``True`` when the bundled model was asked for but is missing, so the random tiny pipeline is used.
    """

    kind: str
    location: str | None = None
    fallback: bool = False

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM_TINY

    @property
    def description(self) -> str:
        """One human-readable phrase naming what is loaded."""
        if self.kind == RANDOM_TINY:
            suffix = " (no bundled model found)" if self.fallback else ""
            return f"randomly initialised tiny pipeline{suffix}"
        if self.kind == "bundled":
            return "bundled ShapesWorld model (diffusers_raven/assets/shapesworld)"
        if self.kind == "local":
            return f"local folder {self.location}"
        return f"Hub repository {self.location}"


def bundled_model_available() -> bool:
    """Whether the bundled model folder exists and holds a pipeline (``model_index.json``)."""
    return (BUNDLED_MODEL_DIR / "model_index.json").is_file()


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~", "\\"))
        or re.match(r"^[A-Za-z]:[\\/]", model) is not None
        or "\\" in model
        or model.count("/") > 1
    )


def resolve_model(model: str | os.PathLike | None = None) -> ResolvedModel:
    """Decide what ``model`` refers to without loading anything (raises ``FileNotFoundError`` for missing paths)."""
    if model is None or str(model) == DEFAULT_MODEL:
        if bundled_model_available():
            return ResolvedModel("bundled", str(BUNDLED_MODEL_DIR))
        return ResolvedModel(RANDOM_TINY, fallback=True)
    name = str(model)
    if not name.strip():
        raise ValueError("the model name is empty; use 'bundled', 'random-tiny', a folder or a Hub repository id.")
    if name == RANDOM_TINY:
        return ResolvedModel(RANDOM_TINY)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model folder {name!r} has no model_index.json, so it is not a saved pipeline "
                "(write one with CausalVideoPipeline.save_pretrained)."
            )
        return ResolvedModel("local", str(path))
    if path.exists():
        raise FileNotFoundError(f"model {name!r} is a file, not a pipeline folder.")
    if _looks_like_path(name) or not _REPO_ID.match(name):
        raise FileNotFoundError(
            f"model folder {name!r} not found (and it is not a Hub repository id); use 'bundled', "
            "'random-tiny', an existing folder or a Hub id like 'owner/name'."
        )
    return ResolvedModel("hub", name)


def random_tiny_pipeline(seed: int = 0) -> CausalVideoPipeline:
    """A tiny ``CausalVideoPipeline`` with random weights (deterministic by ``seed``), built offline.

    Its video is noise-like: it is only good for trying the machinery (streaming, prompt switches, writing files).
    """
    tokenizer = build_word_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
    vae = tiny_vae(seed=seed)
    config = tiny_transformer_config(in_channels=vae.config.z_dim, text_dim=text_encoder.config.d_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CausalWanTransformer3DModel(**config).eval()
    return CausalVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=ConsistencyFlowMatchScheduler(),
    )


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[CausalVideoPipeline, str]:
    """Load the pipeline named by ``model`` (see the module docstring) in ``dtype`` (the checkpoint's own when
    ``None``); returns it and a description of it. ``torch_dtype`` is the older name of ``dtype`` (as in diffusers).

    Raises ``FileNotFoundError`` with a clear message when ``model`` is a missing folder or an unreachable Hub id.
    """
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"Pass `dtype` only (got `dtype={dtype}` and `torch_dtype={torch_dtype}`).")
        warnings.warn("`torch_dtype` is deprecated; pass `dtype` instead.", FutureWarning, stacklevel=2)
        dtype = torch_dtype
    resolved = resolve_model(model)
    if resolved.is_random:
        pipe = random_tiny_pipeline()
        if dtype is not None:
            pipe.to(dtype=dtype)
    else:
        kwargs = {} if dtype is None else {"dtype": dtype}
        pipe = CausalVideoPipeline.from_pretrained(resolved.location, **kwargs)
    return pipe, resolved.description
