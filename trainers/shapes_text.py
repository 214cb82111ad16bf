"""ShapesWorld model chain, stage 1: the word tokenizer and a frozen, randomly initialised UMT5 text encoder.

    python trainers/shapes_text.py --config trainers/shapes_text.yaml
    python trainers/shapes_text.py --config trainers/shapes_text.yaml --d_model 32 --output_dir out/text32

The configuration is read as TRL's scripts read theirs (``trl.TrlParser``): the YAML ``--config`` sets fields of
:class:`ShapesTextConfig`, any field is also a flag, and a misspelt key fails naming the closest field.

The tokenizer's vocabulary is the world's ``vocabulary()`` plus every word of the one-object captions, so no caption
tokenizes to ``<unk>``; this is checked and recorded for every distinct word of all one- and two-object captions,
every one-object caption and a sample of two-object captions. The encoder is never
trained: a random frozen encoder already maps distinct captions to distinct embeddings, and the diffusion model
learns to read them. As a sanity figure the recipe records the minimum pairwise L2 distance between the mean-pooled
embeddings (over the caption's tokens, ``</s>`` included) of all one-object captions plus a random sample of
two-object captions, the same minimum for the zero-padded token sequences the diffusion model cross-attends to, and
the maximum sequence length any caption needs (``model_max_length`` is set to it).

Outputs in ``output_dir``: ``tokenizer/`` and ``text_encoder/`` (``save_pretrained``) and ``text_metrics.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from diffusers_raven.shapes import all_captions, vocabulary
from diffusers_raven.utils.recipe_args import parse_recipe_args
from diffusers_raven.utils.tiny import UNK_TOKEN, build_word_tokenizer, tiny_text_encoder


@dataclass
class ShapesTextConfig:
    """Configuration of the ShapesWorld text recipe (every field can be set in the YAML file or as a flag).

    Parameters that control the model: ``d_model``, ``num_layers``, ``num_heads``, ``d_ff``, ``model_seed``.
    Parameters that control the sanity figures: ``num_two_object_captions``, ``sample_seed``, ``batch_size``.
    """

    d_model: int = field(default=64, metadata={"help": "hidden size (= text_dim of the diffusion model)"})
    num_layers: int = field(default=2, metadata={"help": "encoder layers"})
    num_heads: int = field(default=2, metadata={"help": "attention heads"})
    d_ff: int = field(default=128, metadata={"help": "feed-forward size"})
    model_seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    num_two_object_captions: int = field(
        default=4000, metadata={"help": "two-object captions sampled into the pairwise-distance check"}
    )
    sample_seed: int = field(default=0, metadata={"help": "seed of that sample"})
    batch_size: int = field(default=512, metadata={"help": "captions per encoder forward"})
    output_dir: str = field(default="out/shapes", metadata={"help": "where tokenizer/ and text_encoder/ go"})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads"})


def load_config(path: str, *flags: str) -> ShapesTextConfig:
    """The config of the YAML file ``path`` with ``flags`` (``"--d_model", "32"``) on top."""
    return parse_recipe_args((ShapesTextConfig,), ["--config", path, *flags])[0]


@torch.no_grad()
def embed(tokenizer, text_encoder, captions: list[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled ``[N, d_model]`` and token-sequence ``[N, model_max_length, d_model]`` embeddings.

    The mean is over each caption's tokens (padding excluded). The sequence has its padded positions set to zero, as
    ``WanPipeline.encode_prompt`` hands it to the transformer's cross-attention.
    """
    pooled, sequences = [], []
    for start in range(0, len(captions), batch_size):
        batch = tokenizer(
            captions[start : start + batch_size], padding="max_length", truncation=True, return_tensors="pt"
        )
        hidden = text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask[..., None].to(hidden.dtype)
        pooled.append((hidden * mask).sum(dim=1) / mask.sum(dim=1))
        sequences.append(hidden * mask)
    return torch.cat(pooled), torch.cat(sequences)


def closest_pair(embeddings: torch.Tensor) -> tuple[float, int, int, float]:
    """Minimum pairwise L2 distance, the indices of that pair, and the mean pairwise distance."""
    distances = torch.cdist(embeddings.double(), embeddings.double())
    n = len(embeddings)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    mean_distance = float(distances[off_diagonal].mean())
    distances.fill_diagonal_(float("inf"))
    flat = int(torch.argmin(distances))
    return float(distances.view(-1)[flat]), flat // n, flat % n, mean_distance


def main(argv: list[str] | None = None) -> dict:
    (config,) = parse_recipe_args((ShapesTextConfig,), argv, description=__doc__)
    command = " ".join(["python", "trainers/shapes_text.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(config.num_threads)
    start = time.perf_counter()

    # tokenizer: the world's vocabulary + the words of every one-object caption
    one_object = all_captions(num_objects=1)
    two_object = all_captions(num_objects=2)
    tokenizer = build_word_tokenizer(corpus=one_object, vocab=vocabulary())
    unk_id = tokenizer.convert_tokens_to_ids(UNK_TOKEN)
    # <unk> check. Tokenizing all ~121k two-object captions takes tens of seconds, so: every distinct word of every
    # caption is tokenized on its own (the tokenizer is word-level), and whole captions are tokenized for all
    # one-object captions and the two-object sample used below.
    rng = np.random.default_rng(config.sample_seed)
    sample_size = min(config.num_two_object_captions, len(two_object))
    sampled = [two_object[i] for i in sorted(rng.choice(len(two_object), size=sample_size, replace=False))]
    words = sorted({word for text in one_object + two_object for word in text.split()})
    word_ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    words_with_unk = [word for word, ids in zip(words, word_ids) if unk_id in ids]
    lengths, captions_with_unk = {}, {}
    for name, captions in (("one_object", one_object), ("two_object_sample", sampled)):
        ids = tokenizer(captions, add_special_tokens=True)["input_ids"]
        lengths[name] = max(len(x) for x in ids)
        captions_with_unk[name] = sum(unk_id in x for x in ids)
    # every two-object caption has the same number of words (the grammar is fixed), so its length is exact
    two_object_words = {len(text.split()) for text in two_object}
    max_sequence_length = max(max(lengths.values()), max(two_object_words) + 1)  # + </s>
    tokenizer.model_max_length = max_sequence_length
    print(f"tokenizer: {len(tokenizer)} tokens; {len(words)} distinct caption words, {len(words_with_unk)} -> <unk>; "
          f"captions with <unk>: {captions_with_unk}; max sequence length (with </s>): {max_sequence_length}")

    # frozen random encoder
    text_encoder = tiny_text_encoder(
        len(tokenizer), config.d_model, config.num_layers, config.num_heads, config.d_ff, seed=config.model_seed
    )
    text_encoder.requires_grad_(False)
    num_parameters = sum(p.numel() for p in text_encoder.parameters())

    # sanity figure: distinct captions -> distinct mean-pooled embeddings
    checked = one_object + sampled
    embeddings, sequences = embed(tokenizer, text_encoder, checked, config.batch_size)
    min_distance, i, j, mean_distance = closest_pair(embeddings)
    min_distance_one_object = closest_pair(embeddings[: len(one_object)])[0]
    min_sequence_distance, si, sj, mean_sequence_distance = closest_pair(sequences.flatten(1))
    print(f"min pairwise L2 of mean-pooled embeddings: {min_distance:.4f} over {len(checked)} captions "
          f"({min_distance_one_object:.4f} over the {len(one_object)} one-object captions); mean {mean_distance:.4f}")
    print(f"min pairwise L2 of zero-padded token sequences: {min_sequence_distance:.4f}; "
          f"mean {mean_sequence_distance:.4f}")

    tokenizer_dir = os.path.join(config.output_dir, "tokenizer")
    text_encoder_dir = os.path.join(config.output_dir, "text_encoder")
    tokenizer.save_pretrained(tokenizer_dir)
    text_encoder.save_pretrained(text_encoder_dir)

    # the saved pair reproduces the embeddings
    reloaded, _ = embed(
        AutoTokenizer.from_pretrained(tokenizer_dir),
        UMT5EncoderModel.from_pretrained(text_encoder_dir).eval(),
        checked[:64],
        config.batch_size,
    )
    reload_max_abs_diff = float((reloaded - embeddings[:64]).abs().max())

    results = {
        "config": asdict(config),
        "command": command,
        "vocab_size": len(tokenizer),
        "num_one_object_captions": len(one_object),
        "num_two_object_captions": len(two_object),
        "num_two_object_captions_tokenized": sample_size,
        "distinct_caption_words": len(words),
        "caption_words_with_unk": words_with_unk,
        "captions_with_unk": captions_with_unk,
        "max_sequence_length": max_sequence_length,
        "max_sequence_length_by_caption_type": lengths,
        "two_object_caption_word_counts": sorted(two_object_words),
        "text_encoder_parameters": num_parameters,
        "distance_check_num_captions": len(checked),
        "min_pairwise_l2": min_distance,
        "min_pairwise_l2_one_object": min_distance_one_object,
        "mean_pairwise_l2": mean_distance,
        "closest_pair": [checked[i], checked[j]],
        "min_pairwise_l2_token_sequences": min_sequence_distance,
        "mean_pairwise_l2_token_sequences": mean_sequence_distance,
        "closest_pair_token_sequences": [checked[si], checked[sj]],
        "reload_max_abs_diff": reload_max_abs_diff,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "tokenizer_dir": tokenizer_dir,
        "text_encoder_dir": text_encoder_dir,
    }
    with open(os.path.join(config.output_dir, "text_metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"closest pair: {results['closest_pair']}; reload max abs diff {reload_max_abs_diff:.2e}; "
          f"saved {tokenizer_dir} and {text_encoder_dir} in {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
