"""Prompt encoding shared by the pipeline and the recipes (the Wan / UMT5 conventions)."""

from __future__ import annotations

import html
import importlib.util
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

__all__ = ["clean_prompt", "encode_prompts"]


def clean_prompt(text: str) -> str:
    """Prompt clean-up as Wan does it: ``ftfy`` (if installed), double HTML unescape, collapse whitespace."""
    if importlib.util.find_spec("ftfy") is not None:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: UMT5EncoderModel,
    prompts: str | Sequence[str],
    max_sequence_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """UMT5 last hidden states ``(batch, max_sequence_length, d_model)`` with padded positions set to zero.

    Matches ``WanPipeline._get_t5_prompt_embeds`` (with ``num_videos_per_prompt=1``). Gradients are not disabled;
    wrap the call in ``torch.no_grad()`` for a frozen encoder.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    encoder_device = next(text_encoder.parameters()).device
    mask = batch.attention_mask.to(encoder_device)
    hidden = text_encoder(batch.input_ids.to(encoder_device), mask).last_hidden_state
    hidden = hidden.to(device=device if device is not None else encoder_device, dtype=dtype or text_encoder.dtype)
    # Like Wan: keep the first ``seq_len`` positions of each row (the real tokens plus ``</s>``), zero the rest.
    seq_lens = mask.gt(0).sum(dim=1).to(hidden.device)
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < seq_lens[:, None]
    return hidden.masked_fill(~keep.unsqueeze(-1), 0.0)
