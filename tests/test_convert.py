"""Tests for the Self Forcing / LongLive / CausVid checkpoint converter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from diffusers_raven.convert import (
    add_convert_parser,
    convert_checkpoint,
    convert_checkpoint_with_report,
    normalize_state_dict,
    select_state_dict,
)
from diffusers_raven.convert.wan_keys import infer_wan_config

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=16,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=32,
)
VARIANTS = {
    "t2v": {},
    "no_cross_attn_norm": {"cross_attn_norm": False},
    "i2v": {"image_dim": 8, "added_kv_proj_dim": 32},
}

# Hand-written inverse of the diffusers layout (diffusers name -> original Wan name). It is checked against
# diffusers' own ``convert_wan_transformer_to_diffusers`` in ``test_reference_inverse_matches_diffusers``.
_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def to_original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        if rest == "scale_shift_table":
            return f"blocks.{index}.modulation"
        module, param = rest.rsplit(".", 1)
        return f"blocks.{index}.{_BLOCK[module]}.{param}"
    module, param = key.rsplit(".", 1)
    return f"{_TOP[module]}.{param}"


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_original_key(k): v.clone() for k, v in state_dict.items()}


def fsdp_prefixed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mimic an FSDP-trained generator: ``model._fsdp_wrapped_module.`` plus wrapped blocks."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{index}._fsdp_wrapped_module.{rest}"
        out[f"model._fsdp_wrapped_module.{key}"] = value
    return out


def make_model(seed: int = 0, **extra) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY, **extra).eval()
    with torch.no_grad():
        for param in model.parameters():  # randomise norms and tables too, so that swapped names would show
            param.normal_(0.0, 0.2)
    return model


def model_inputs(model: WanTransformer3DModel, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, 4, 2, 4, 4, generator=gen),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=gen),
    }
    if model.config.image_dim is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 3, model.config.image_dim, generator=gen)
    return inputs


def assert_same_state_dict(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def models() -> dict[str, WanTransformer3DModel]:
    return {name: make_model(i, **extra) for i, (name, extra) in enumerate(VARIANTS.items())}


# --------------------------------------------------------------------------------------------------- key mapping


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_inverse_matches_diffusers(models, variant):
    """The test's own inverse mapping is right: diffusers' converter maps it back to the model's state dict."""
    expected = models[variant].state_dict()
    reference = convert_wan_transformer_to_diffusers(to_original(expected))
    assert_same_state_dict(reference, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_normalize_matches_diffusers_conversion(models, variant):
    original = to_original(models[variant].state_dict())
    reference = convert_wan_transformer_to_diffusers(dict(original))
    converted, prefix, key_format = normalize_state_dict(fsdp_prefixed(original))
    assert prefix == "model." and key_format == "original"
    assert_same_state_dict(converted, reference)


# ---------------------------------------------------------------------------------------------- full conversion


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_convert_roundtrip(models, variant, tmp_path):
    model = models[variant]
    original = to_original(model.state_dict())
    ckpt = tmp_path / "self_forcing.pt"
    torch.save({"generator_ema": fsdp_prefixed(original), "step": 1000}, ckpt)

    out = convert_checkpoint(ckpt, tmp_path / "out", config_overrides={"num_attention_heads": 2})
    assert out == tmp_path / "out"
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "CausalWanTransformer3DModel"
    assert config["num_frames_per_chunk"] == 3
    for name in (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "ffn_dim",
        "in_channels",
        "out_channels",
        "text_dim",
        "freq_dim",
        "cross_attn_norm",
        "image_dim",
        "added_kv_proj_dim",
    ):
        assert config[name] == model.config[name], name
    assert tuple(config["patch_size"]) == tuple(model.config.patch_size)

    loaded, info = WanTransformer3DModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # (a) exactly the original weights
    assert_same_state_dict(loaded.state_dict(), model.state_dict())
    # (b) diffusers' own conversion of the flat original dict agrees
    assert_same_state_dict(loaded.state_dict(), convert_wan_transformer_to_diffusers(dict(original)))
    # (c) same forward pass. A model loaded from disk can differ from the in-memory one in the last bits (BLAS
    # kernels depend on buffer alignment), so compare tightly with the original and exactly with the original
    # model's own save_pretrained -> from_pretrained round trip.
    model.save_pretrained(tmp_path / "baseline")
    baseline = WanTransformer3DModel.from_pretrained(tmp_path / "baseline").eval()
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).sample
        actual = loaded.eval()(**inputs).sample
        reloaded = baseline(**inputs).sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual, reloaded, rtol=0, atol=0)


def test_convert_not_causal_and_dtype(models, tmp_path):
    ckpt = tmp_path / "causvid.pt"
    torch.save({f"module.{k}": v for k, v in to_original(models["t2v"].state_dict()).items()}, ckpt)
    report = convert_checkpoint_with_report(
        ckpt, tmp_path / "out", dtype="bfloat16", causal=False, config_overrides={"attention_head_dim": 16}
    )
    assert report.source_key == "(top level)" and report.prefix == "module."
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and "num_frames_per_chunk" not in config
    assert config["num_attention_heads"] == 2
    weights = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    expected = models["t2v"].state_dict()
    assert all(torch.equal(weights[k], v.to(torch.bfloat16)) for k, v in expected.items())


def test_convert_comfy_safetensors(models, tmp_path):
    """A ``model.diffusion_model.`` prefixed safetensors file (ComfyUI layout) converts too."""
    original = to_original(models["t2v"].state_dict())
    ckpt = tmp_path / "wan.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}, ckpt)
    out = convert_checkpoint(ckpt, tmp_path / "out", config_overrides={"num_attention_heads": 2, "eps": 1e-5})
    loaded = WanTransformer3DModel.from_pretrained(out)
    assert loaded.config.eps == 1e-5
    assert_same_state_dict(loaded.state_dict(), models["t2v"].state_dict())


def test_loads_with_causal_subclass(models, tmp_path):
    try:
        from diffusers_raven.models import CausalWanTransformer3DModel
    except ImportError:
        pytest.skip("CausalWanTransformer3DModel is not available yet")
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"generator": to_original(models["t2v"].state_dict())}, ckpt)
    out = convert_checkpoint(
        ckpt, tmp_path / "out", config_overrides={"num_attention_heads": 2, "num_frames_per_chunk": 2}
    )
    loaded = CausalWanTransformer3DModel.from_pretrained(out)
    assert loaded.config.num_frames_per_chunk == 2
    assert_same_state_dict(loaded.state_dict(), models["t2v"].state_dict())


# ---------------------------------------------------------------------------------------------------- key rule


def test_auto_key_rule(models):
    ema = to_original(models["t2v"].state_dict())
    gen = {k: v + 1 for k, v in ema.items()}
    both = {"generator": gen, "generator_ema": ema, "critic": {"x": torch.zeros(1)}, "step": 3}

    assert select_state_dict(both, None)[1] == "generator_ema"
    assert select_state_dict(both, "auto")[0] is not None
    assert torch.equal(select_state_dict(both, "auto")[0]["head.head.weight"], ema["head.head.weight"])
    assert torch.equal(select_state_dict(both, "generator")[0]["head.head.weight"], gen["head.head.weight"])
    assert select_state_dict({"generator": gen, "generator_ema": {}}, "auto")[1] == "generator"
    assert select_state_dict({"model": gen, "optimizer": {"state": {}}}, "auto")[1] == "model"
    assert select_state_dict(ema, "auto")[1] == "(top level)"
    # flat dicts: "<name>." prefixes count as entries
    flat = {f"generator.{k}": v for k, v in gen.items()} | {f"fake_score.{k}": v for k, v in ema.items()}
    picked, name = select_state_dict(flat, "auto")
    assert name == "generator" and torch.equal(picked["head.head.weight"], gen["head.head.weight"])

    with pytest.raises(ValueError, match="key='generator_ema'.*no entry"):
        select_state_dict({"generator": gen}, "generator_ema")
    with pytest.raises(ValueError, match="nested entries.*--key"):
        select_state_dict(both, "none")
    with pytest.raises(ValueError, match="key must be one of"):
        select_state_dict(both, "ema")
    with pytest.raises(ValueError, match="several models under different key prefixes"):
        normalize_state_dict(flat)


# ------------------------------------------------------------------------------------------------------- LoRA


def _lora(rank: int, seed: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.self_attn.q": (32, 32), "blocks.1.cross_attn.v": (32, 32), "blocks.1.ffn.0": (64, 32)}
    tensors, pairs = {}, {}
    for module, (out_f, in_f) in shapes.items():
        a, b = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        pairs[module] = (a, b)
    return tensors, pairs


@pytest.mark.parametrize(
    ("file_extra", "lora_alpha", "scale"),
    [({}, 8.0, 2.0), ({"lora_alpha": 2, "rank": 4}, None, 0.5), ({}, None, 1.0)],
    ids=["argument", "from_file", "default_alpha_eq_rank"],
)
def test_lora_merge(models, tmp_path, file_extra, lora_alpha, scale):
    base = to_original(models["t2v"].state_dict())
    ckpt = tmp_path / "longlive_base.pt"
    torch.save({"generator": fsdp_prefixed(base)}, ckpt)
    tensors, pairs = _lora(rank=4)
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": tensors, **file_extra}, lora_path)

    report = convert_checkpoint_with_report(
        ckpt, tmp_path / "out", lora=lora_path, lora_alpha=lora_alpha, config_overrides={"num_attention_heads": 2}
    )
    assert report.lora is not None and report.lora.num_modules == 3 and report.lora.scales == {scale}
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    merged_keys = {"blocks.0.attn1.to_q.weight", "blocks.1.attn2.to_v.weight", "blocks.1.ffn.net.0.proj.weight"}
    for module, (a, b) in pairs.items():
        weight = base[f"{module}.weight"]
        expected = weight + scale * (b @ a)  # hand computation of W + alpha / rank * B @ A
        key = {
            "blocks.0.self_attn.q": "blocks.0.attn1.to_q.weight",
            "blocks.1.cross_attn.v": "blocks.1.attn2.to_v.weight",
            "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj.weight",
        }[module]
        torch.testing.assert_close(loaded[key], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(loaded[key], weight)
    untouched = models["t2v"].state_dict()
    for key, value in untouched.items():
        if key not in merged_keys:
            assert torch.equal(loaded[key], value), key


def test_lora_safetensors_diffusers_names_and_rank_check(models, tmp_path):
    ckpt = tmp_path / "base.pt"
    torch.save({"model": to_original(models["t2v"].state_dict())}, ckpt)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen)
    lora_path = tmp_path / "lora.safetensors"
    save_file(
        {"transformer.blocks.0.attn1.to_k.lora_A.weight": a, "transformer.blocks.0.attn1.to_k.lora_B.weight": b},
        lora_path,
        metadata={"lora_alpha": "1.0"},
    )
    convert_checkpoint(ckpt, tmp_path / "out", lora=lora_path, config_overrides={"num_attention_heads": 2})
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    expected = models["t2v"].state_dict()["blocks.0.attn1.to_k.weight"] + 0.5 * (b @ a)
    torch.testing.assert_close(loaded["blocks.0.attn1.to_k.weight"], expected, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="lora_rank=8 does not match the rank 2"):
        convert_checkpoint(
            ckpt, tmp_path / "o2", lora=lora_path, lora_rank=8, config_overrides={"num_attention_heads": 2}
        )
    bad = tmp_path / "bad_lora.pt"
    torch.save({"blocks.0.self_attn.zz.lora_A.weight": a, "blocks.0.self_attn.zz.lora_B.weight": b}, bad)
    with pytest.raises(ValueError, match="lora: module 'blocks.0.self_attn.zz' is not a Wan layer"):
        convert_checkpoint(ckpt, tmp_path / "o3", lora=bad, config_overrides={"num_attention_heads": 2})


def test_lora_peft_folder_and_diffusers_format_base(models, tmp_path):
    """A peft adapter folder (alpha from adapter_config.json) merged into a checkpoint already in diffusers names."""
    expected = models["t2v"].state_dict()
    ckpt = tmp_path / "diffusers_names.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in expected.items()}}, ckpt)
    converted, prefix, key_format = normalize_state_dict({f"model.{k}": v for k, v in expected.items()})
    assert (prefix, key_format) == ("model.", "diffusers")
    assert_same_state_dict(converted, expected)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)
    save_file(
        {
            "base_model.model.blocks.1.self_attn.o.lora_A.weight": a,
            "base_model.model.blocks.1.self_attn.o.lora_B.weight": b,
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 12, "peft_type": "LORA"}))
    report = convert_checkpoint_with_report(
        ckpt, tmp_path / "out", lora=adapter, config_overrides={"num_attention_heads": 2}
    )
    assert report.key_format == "diffusers" and report.lora.scales == {3.0}
    assert "merged LoRA into 1 layers (scale 3" in report.summary()
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    torch.testing.assert_close(
        loaded["blocks.1.attn1.to_out.0.weight"], expected["blocks.1.attn1.to_out.0.weight"] + 3.0 * (b @ a)
    )


# ----------------------------------------------------------------------------------------------------- errors


def test_config_inference_defaults():
    meta = {
        "patch_embedding.weight": torch.empty(1536, 16, 1, 2, 2, device="meta"),
        "proj_out.weight": torch.empty(64, 1536, device="meta"),
        "condition_embedder.text_embedder.linear_1.weight": torch.empty(1536, 4096, device="meta"),
        "condition_embedder.time_embedder.linear_1.weight": torch.empty(1536, 256, device="meta"),
        **{f"blocks.{i}.ffn.net.0.proj.weight": torch.empty(8960, 1536, device="meta") for i in range(30)},
        "blocks.0.norm2.weight": torch.empty(1536, device="meta"),
    }
    config = infer_wan_config(meta)
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (12, 128)
    assert (config["num_layers"], config["ffn_dim"], config["text_dim"], config["freq_dim"]) == (30, 8960, 4096, 256)
    assert (config["in_channels"], config["out_channels"], config["cross_attn_norm"]) == (16, 16, True)
    assert infer_wan_config(meta, num_attention_heads=24)["attention_head_dim"] == 64


def test_errors(models, tmp_path):
    original = to_original(models["t2v"].state_dict())
    ckpt = tmp_path / "ok.pt"
    torch.save({"generator": original}, ckpt)

    with pytest.raises(ValueError, match="cannot infer num_attention_heads.*--num-attention-heads"):
        convert_checkpoint(ckpt, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "o")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="could not read checkpoint .*corrupt.pt"):
        convert_checkpoint(corrupt, tmp_path / "o")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(ValueError, match="could not read checkpoint"):
        convert_checkpoint(truncated, tmp_path / "o")

    unknown = tmp_path / "unet.pt"
    torch.save({"down_blocks.0.conv.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(ValueError, match="does not look like a Wan transformer"):
        convert_checkpoint(unknown, tmp_path / "o")
    extra = tmp_path / "extra.pt"
    torch.save({"generator": original | {"blocks.0.self_attn.extra.weight": torch.zeros(1)}}, extra)
    with pytest.raises(ValueError, match="not part of a Wan-2.1 transformer: 'blocks.0.self_attn.extra.weight'"):
        convert_checkpoint(extra, tmp_path / "o")
    broken = tmp_path / "broken.pt"
    torch.save({"generator": {k: v for k, v in original.items() if k != "blocks.1.ffn.2.bias"}}, broken)
    with pytest.raises(ValueError, match="missing 'blocks.1.ffn.net.2.bias'"):
        convert_checkpoint(broken, tmp_path / "o", config_overrides={"num_attention_heads": 2})

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"generator": original, "args": argparse.Namespace(lr=1e-5)}, unsafe)
    with pytest.raises(ValueError, match="argparse.Namespace.*--trust-pickle"):
        convert_checkpoint(unsafe, tmp_path / "o", config_overrides={"num_attention_heads": 2})
    convert_checkpoint(unsafe, tmp_path / "o", trust_pickle=True, config_overrides={"num_attention_heads": 2})

    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_checkpoint(ckpt, tmp_path / "o", dtype="int8")
    with pytest.raises(ValueError, match="config_overrides: unknown config key"):
        convert_checkpoint(ckpt, tmp_path / "o", config_overrides={"num_heads": 2})
    with pytest.raises(ValueError, match="num_attention_heads=3 does not divide the hidden size 32"):
        convert_checkpoint(ckpt, tmp_path / "o", config_overrides={"num_attention_heads": 3})
    with pytest.raises(ValueError, match="without a LoRA file"):
        convert_checkpoint(ckpt, tmp_path / "o", lora_alpha=4.0, config_overrides={"num_attention_heads": 2})


# -------------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-raven")
    add_convert_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parser(models, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"generator_ema": fsdp_prefixed(to_original(models["t2v"].state_dict()))}, ckpt)
    args = _parser().parse_args(
        [
            "convert",
            "--checkpoint",
            str(ckpt),
            "--output",
            str(tmp_path / "out"),
            "--num-attention-heads",
            "2",
            "--num-frames-per-chunk",
            "4",
            "--dtype",
            "float16",
        ]
    )
    assert args.key == "auto" and args.causal
    assert args.func(args) == 0
    assert "entry generator_ema" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_frames_per_chunk"] == 4
    weights = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}


def test_cli_main(models, tmp_path, capsys):
    try:
        import diffusers_raven.cli_generate  # noqa: F401  (written separately; cli.main needs it)
    except ModuleNotFoundError as err:
        if err.name != "diffusers_raven.cli_generate":
            raise
        pytest.skip("diffusers_raven.cli_generate is not available yet")
    from diffusers_raven.cli import main

    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": to_original(models["t2v"].state_dict())}, ckpt)
    out = tmp_path / "out"
    assert main(["convert", "--checkpoint", str(ckpt), "--output", str(out), "--num-attention-heads", "2"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()

    assert main(["convert", "--checkpoint", str(tmp_path / "nope.pt"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err and "nope.pt" in err


def test_docs_mention_key_rule():
    doc = Path(__file__).resolve().parents[1] / "docs" / "converting.md"
    if not doc.is_file():
        pytest.skip("docs/converting.md missing")
    text = doc.read_text()
    assert "generator_ema" in text and "--lora" in text and "CausalWanTransformer3DModel.from_pretrained" in text
