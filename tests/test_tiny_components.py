"""Offline tiny components: tokenizer round-trip, prompt encoding vs. ``WanPipeline``, end-to-end tiny pipeline."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from diffusers_raven.utils.tiny import (  # noqa: E402
    DEFAULT_CORPUS,
    DEFAULT_VOCAB,
    build_word_tokenizer,
    clean_prompt,
    encode_prompts,
    tiny_text_encoder,
    tiny_transformer_config,
    tiny_vae,
    tiny_wan_components,
)

PROMPTS = [
    "A red circle moves from left to right on a black background.",
    "  Two   BLUE squares\tbounce &amp; spin, then a zebra appears!  ",
    "",
]
MAX_LEN = 16


def _wan_pipeline(seed: int = 0) -> WanPipeline:
    tokenizer = build_word_tokenizer()
    torch.manual_seed(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed),
        transformer=WanTransformer3DModel(**tiny_transformer_config()),
        vae=tiny_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return _wan_pipeline()


def _encode(tok: PreTrainedTokenizerBase, texts: list[str], **kwargs) -> dict[str, list]:
    enc = tok(texts, **kwargs)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_tokenizer_special_tokens_and_padding():
    tok = build_word_tokenizer(model_max_length=32)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert tok.padding_side == "right" and tok.model_max_length == 32
    assert len(tok) == 3 + len(DEFAULT_VOCAB)

    ids = tok("A RED ball, spinning!")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "red", "ball", ",", "spinning", "!", "</s>"]

    enc = tok(["red ball", "a blue circle moves left"], padding="max_length", max_length=10)
    assert all(len(row) == 10 for row in enc["input_ids"])
    assert enc["input_ids"][0][2] == tok.eos_token_id and enc["input_ids"][0][3:] == [0] * 7
    assert enc["attention_mask"][0] == [1, 1, 1] + [0] * 7
    assert enc["attention_mask"][1] == [1] * 6 + [0] * 4

    unk = tok("a xylophone quokka")["input_ids"]
    assert unk == [tok.convert_tokens_to_ids("a"), 2, 2, 1]

    truncated = tok(" ".join(["red"] * 40), padding="max_length", max_length=8, truncation=True)["input_ids"]
    assert len(truncated) == 8 and truncated[-1] == tok.eos_token_id


def test_tokenizer_vocab_and_corpus():
    tok = build_word_tokenizer(corpus=["The Cat sat.", "the dog, the CAT"], vocab=["zebra", "Cat"])
    assert tok.convert_ids_to_tokens(list(range(3, len(tok)))) == ["zebra", "cat", "the", "sat", ".", "dog", ","]
    assert tok("zebra dog")["input_ids"] == [3, 8, 1]

    default = build_word_tokenizer()
    for prompt in DEFAULT_CORPUS:
        assert default.unk_token_id not in default(prompt)["input_ids"], prompt


def test_tokenizer_round_trip(tmp_path):
    tok = build_word_tokenizer()
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    # transformers 5 records the generic fast backend; AutoTokenizer must resolve it to the same class.
    assert type(reloaded).__name__ == config["tokenizer_class"] == type(tok).__name__

    for kwargs in ({}, {"padding": "max_length", "max_length": MAX_LEN, "truncation": True}):
        assert _encode(reloaded, PROMPTS, **kwargs) == _encode(tok, PROMPTS, **kwargs)
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2)
    assert reloaded.padding_side == "right" and reloaded.model_max_length == tok.model_max_length
    assert reloaded.get_vocab() == tok.get_vocab()


def test_tiny_builders_are_deterministic():
    state = torch.random.get_rng_state()
    a, b, c = (tiny_text_encoder(50, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state), "builders must not consume the global RNG"
    assert not a.training and a.config.vocab_size == 50 and a.config.d_model == 32
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.shared.weight, c.shared.weight)

    v1, v2 = tiny_vae(seed=3), tiny_vae(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(v1.parameters(), v2.parameters()))


def test_tiny_vae_and_transformer_shapes(pipe):
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)
    assert pipe.vae.config.latents_mean == [0.0] * 4 and pipe.vae.config.latents_std == [1.0] * 4
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 5, 32, 32)).latent_dist.mode()
    assert latents.shape == (1, 4, 2, 4, 4)

    cfg = tiny_transformer_config()
    head = cfg["attention_head_dim"]
    h = 2 * (head // 6)
    assert h % 2 == 0 and (head - 2 * h) % 2 == 0 and head - 2 * h > 0
    assert cfg["in_channels"] == pipe.vae.config.z_dim and cfg["text_dim"] == pipe.text_encoder.config.d_model
    with pytest.raises(ValueError):
        tiny_transformer_config(attention_head_dim=9)
    with torch.no_grad():
        out = pipe.transformer(latents, torch.tensor([500.0]), torch.randn(1, MAX_LEN, cfg["text_dim"])).sample
    assert out.shape == latents.shape


def test_encode_prompts_matches_wan_pipeline(pipe):
    with torch.no_grad():
        ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS, max_sequence_length=MAX_LEN)
        ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=MAX_LEN)
        assert ours.shape == (len(PROMPTS), MAX_LEN, 32)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)

        # Padded positions are exactly zero, real tokens (incl. ``</s>``) are not.
        cleaned = [clean_prompt(p) for p in PROMPTS]
        assert cleaned[1] == "Two BLUE squares bounce & spin, then a zebra appears!"
        mask = torch.tensor(pipe.tokenizer(cleaned, padding="max_length", max_length=MAX_LEN)["attention_mask"])
        assert torch.all(ours[mask == 0] == 0) and torch.all(ours[mask == 1].abs().sum(-1) > 0)

        # Single string, truncation and the classifier-free-guidance path of ``encode_prompt``.
        long_prompt = " ".join(["red circle"] * 20)
        torch.testing.assert_close(
            encode_prompts(pipe.tokenizer, pipe.text_encoder, long_prompt, max_sequence_length=MAX_LEN),
            pipe._get_t5_prompt_embeds(long_prompt, max_sequence_length=MAX_LEN),
            rtol=0,
            atol=0,
        )
        pos, neg = pipe.encode_prompt(
            PROMPTS[:2], negative_prompt=["blurry", ""], do_classifier_free_guidance=True, max_sequence_length=MAX_LEN
        )
        torch.testing.assert_close(pos, ours[:2], rtol=0, atol=0)
        torch.testing.assert_close(
            neg, encode_prompts(pipe.tokenizer, pipe.text_encoder, ["blurry", ""], MAX_LEN), rtol=0, atol=0
        )


def _generate(p: WanPipeline) -> np.ndarray:
    return p(
        "A red circle moves from left to right",
        negative_prompt="blurry",
        num_inference_steps=2,
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=3.0,
        max_sequence_length=MAX_LEN,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames


def test_wan_pipeline_runs_and_round_trips(pipe, tmp_path):
    video = _generate(pipe)
    assert video.shape == (1, 5, 32, 32, 3)
    assert np.isfinite(video).all() and video.min() >= 0.0 and video.max() <= 1.0

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["tokenizer"][0] == "transformers"

    reloaded = WanPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    for name in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler"):
        assert type(getattr(reloaded, name)) is type(getattr(pipe, name)), name
    assert _encode(reloaded.tokenizer, PROMPTS) == _encode(pipe.tokenizer, PROMPTS)
    for name in ("text_encoder", "transformer", "vae"):
        for (key, a), b in zip(
            getattr(pipe, name).state_dict().items(), getattr(reloaded, name).state_dict().values()
        ):
            assert torch.equal(a, b), f"{name}.{key}"

    # Weights are bit-identical, but memory-mapped tensors can take other CPU kernel paths (~1e-7 differences).
    np.testing.assert_allclose(_generate(reloaded), video, atol=1e-4, rtol=0)


def test_tiny_wan_components_pipeline():
    components = tiny_wan_components(seed=1)
    assert set(components) == {"tokenizer", "text_encoder", "transformer", "vae", "scheduler"}
    p = WanPipeline(**components)
    p.set_progress_bar_config(disable=True)
    video = p(
        "two green stars",
        num_inference_steps=1,
        height=32,
        width=32,
        num_frames=1,
        guidance_scale=1.0,
        max_sequence_length=8,
        output_type="np",
    ).frames
    assert video.shape == (1, 1, 32, 32, 3)
