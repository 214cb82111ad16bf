"""Offline building blocks for tiny Wan-style text-to-video pipelines.

Everything here is built from configs with random weights: nothing is downloaded from the Hub. The pieces are a
word-level tokenizer, a small UMT5 text encoder, a small ``AutoencoderKLWan`` with Wan's 4x temporal / 8x spatial
compression, the config of a small ``WanTransformer3DModel`` and a prompt encoder that matches ``WanPipeline``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from .text import clean_prompt, encode_prompts

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_VOCAB",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "build_word_tokenizer",
    "clean_prompt",
    "encode_prompts",
    "tiny_text_encoder",
    "tiny_transformer",
    "tiny_transformer_config",
    "tiny_vae",
    "tiny_wan_components",
]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
#: Special tokens in id order: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (the T5 / UMT5 convention).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)

_COLOURS = """
red green blue yellow orange purple violet pink magenta cyan teal turquoise white black gray grey silver gold
golden brown beige cream navy maroon olive lime indigo crimson scarlet amber colour color colours colors colorful
colourful bright dark light pale deep vivid pastel neon glowing shiny matte transparent striped dotted
""".split()

_SHAPES = """
shape shapes circle circles square squares triangle triangles rectangle rectangles star stars heart hearts diamond
diamonds hexagon pentagon oval ellipse ring rings line lines dot dots cross arrow spiral cube cubes sphere spheres
ball balls box boxes block blocks cone cylinder pyramid disk disc blob particle particles point points curve wave
waves grid pattern round flat solid hollow outline big small large tiny huge little medium tall short wide narrow
long thin thick
""".split()

_MOTION = """
move moves moving moved motion slide slides sliding glide glides gliding roll rolls rolling bounce bounces bouncing
spin spins spinning rotate rotates rotating rotation turn turns turning orbit orbits orbiting fly flies flying fall
falls falling drop drops dropping rise rises rising float floats floating drift drifts drifting jump jumps jumping
run runs running walk walks walking swim swims swimming shake shakes shaking grow grows growing shrink shrinks
shrinking expand expands expanding zoom zooms zooming pan pans panning fade fades fading flash flashes flashing
blink blinks blinking pulse pulses pulsing swing swings swinging wobble wobbles wobbling dance dances dancing chase
chases chasing follow follows following collide collides colliding appear appears appearing disappear disappears
disappearing stop stops stopping start starts starting stay stays still static slowly quickly slow fast faster
slower steady steadily smooth smoothly gently rapidly speed direction left right up down upward downward upwards
downwards forward forwards backward backwards across around along through toward towards away back forth clockwise
counterclockwise anticlockwise diagonal diagonally horizontal horizontally vertical vertically centre center middle
edge edges corner corners side sides top bottom front behind
""".split()

_SCENE = """
background backgrounds scene scenes sky skies cloud clouds sun moon night day sunset sunrise water sea ocean river
lake beach sand grass field forest tree trees mountain mountains hill hills city street road room wall floor table
space stars desert snow rain fog wind fire smoke light lights shadow shadows plain empty blank gradient texture
canvas screen frame frames video videos clip camera shot view close closeup wide aerial landscape portrait
animation animated cartoon realistic simple minimal abstract scenery indoor outdoor indoors outdoors world
""".split()

_THINGS = """
object objects thing things person people man woman boy girl child children dog dogs cat cats bird birds fish horse
car cars train plane boat ship robot flower flowers leaf leaves apple house window door
""".split()

_NUMBERS = """
zero one two three four five six seven eight nine ten eleven twelve many several few some all each every both
first second third last next number numbers pair group single double half
0 1 2 3 4 5 6 7 8 9 10
""".split()

_FUNCTION_WORDS = """
a an the this that these those it its it's they them their there here he she his her we you i me my our your
and or but nor so then than as if when while where which who whom whose what why how of in on at to from by with
without into onto over under above below between among beside near far off out about after before during until
since upon within is are was were be been being am has have had do does did can could will would shall should
may might must not no yes very too also only just more most less least much other another same such again once
twice always never while together apart alone inside outside against per
""".split()

_PUNCTUATION = list(",.!?;:'\"-()/&")

#: Generic video-prompt vocabulary so that a randomly initialised tiny pipeline tokenizes ordinary prompts with few
#: ``<unk>`` tokens: colours, shapes, motion words, backgrounds, numbers, common English function words, punctuation.
DEFAULT_VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(_COLOURS + _SHAPES + _MOTION + _SCENE + _THINGS + _NUMBERS + _FUNCTION_WORDS + _PUNCTUATION)
)

#: A few example prompts; every word in them is in :data:`DEFAULT_VOCAB`.
DEFAULT_CORPUS: tuple[str, ...] = (
    "A red circle moves from left to right on a black background.",
    "Two blue squares bounce up and down on a white background.",
    "A small yellow triangle spins slowly in the center of the frame.",
    "A green ball rolls across the grass while the camera pans to the right.",
    "Three purple stars fly upward into the night sky.",
    "An orange sun rises over the sea at sunrise, the camera zooms in.",
)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # ``Whitespace`` splits on ``\w+|[^\w\s]+``; ``Punctuation`` then isolates every punctuation character.
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")])


def build_word_tokenizer(
    corpus: Iterable[str] | None = None,
    vocab: Iterable[str] | None = None,
    model_max_length: int = 32,
) -> PreTrainedTokenizerFast:
    """Build a lower-casing word-level tokenizer with T5-style special tokens.

    The vocabulary is ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2) followed by the words of ``vocab`` and then those
    of ``corpus`` in order of first appearance. Both are normalised and split exactly as at encoding time, so either
    can hold single words or whole sentences. With neither given, :data:`DEFAULT_VOCAB` is used. Every encoding gets
    ``</s>`` appended; padding is on the right.
    """
    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer()
    words: dict[str, None] = {}
    sources: list[Iterable[str]] = [s for s in (vocab, corpus) if s is not None]
    if not sources:
        sources = [DEFAULT_VOCAB]
    for source in sources:
        for text in source:
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                if word not in SPECIAL_TOKENS:
                    words.setdefault(word)

    token_to_id = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    backend = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token=UNK_TOKEN))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    eos_id = token_to_id[EOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU generator for a build and restore the caller's global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_text_encoder(
    vocab_size: int,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    seed: int = 0,
) -> UMT5EncoderModel:
    """A randomly initialised (deterministic by ``seed``) UMT5 encoder in eval mode."""
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        model = UMT5EncoderModel(config)
    return model.eval()


def tiny_vae(
    z_dim: int = 4,
    base_dim: int = 16,
    seed: int = 0,
    dim_mult: Sequence[int] = (1, 1, 2, 2),
) -> AutoencoderKLWan:
    """A randomly initialised Wan 2.1 VAE: 8x spatial (three down-samplings) and 4x temporal compression.

    ``latents_mean``/``latents_std`` are zeros/ones, so pipeline latent normalisation is the identity.
    """
    dim_mult = list(dim_mult)
    if len(dim_mult) != 4:
        raise ValueError("dim_mult needs 4 entries (three 2x spatial down-samplings -> scale factor 8)")
    with _seeded(seed):
        vae = AutoencoderKLWan(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=dim_mult,
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
            scale_factor_temporal=4,
            scale_factor_spatial=8,
        )
    return vae.eval()


def tiny_transformer_config(
    in_channels: int = 4,
    text_dim: int = 32,
    num_attention_heads: int = 2,
    attention_head_dim: int = 24,
    num_layers: int = 2,
    ffn_dim: int = 64,
    freq_dim: int = 16,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    rope_max_seq_len: int = 1024,
) -> dict[str, Any]:
    """Config kwargs of a tiny ``WanTransformer3DModel`` (``in_channels`` = VAE ``z_dim``, ``text_dim`` = d_model).

    ``WanRotaryPosEmbed`` splits the head dim into h = w = ``2 * (d // 6)`` and t = the rest; all three must be even.
    """
    h_dim = 2 * (attention_head_dim // 6)
    t_dim = attention_head_dim - 2 * h_dim
    if h_dim <= 0 or t_dim <= 0 or t_dim % 2:
        raise ValueError(
            f"attention_head_dim={attention_head_dim} gives odd/empty rotary parts (t={t_dim}, h=w={h_dim})"
        )
    return {
        "patch_size": tuple(patch_size),
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": attention_head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "text_dim": text_dim,
        "freq_dim": freq_dim,
        "ffn_dim": ffn_dim,
        "num_layers": num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": rope_max_seq_len,
    }


def tiny_transformer(seed: int = 0, **config: Any) -> WanTransformer3DModel:
    """A randomly initialised ``WanTransformer3DModel`` from :func:`tiny_transformer_config` (overridable)."""
    with _seeded(seed):
        model = WanTransformer3DModel(**tiny_transformer_config(**config))
    return model.eval()


def tiny_wan_components(seed: int = 0, vocab: Iterable[str] | None = None) -> dict[str, Any]:
    """All five ``WanPipeline`` components, tiny and random: ``WanPipeline(**tiny_wan_components())``."""
    tokenizer = build_word_tokenizer(vocab=vocab)
    text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
    vae = tiny_vae(seed=seed)
    transformer = tiny_transformer(seed=seed, in_channels=vae.config.z_dim, text_dim=text_encoder.config.d_model)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }
