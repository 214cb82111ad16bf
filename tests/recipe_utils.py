"""Helpers of the recipe tests: load a script of ``trainers/`` as a module, write a YAML config."""

import importlib.util
import os
import sys

import yaml

TRAINERS = os.path.join(os.path.dirname(__file__), os.pardir, "trainers")


def load_recipe(name: str):
    """Import ``trainers/<name>.py`` (not a package) as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(TRAINERS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def write_config(path, **values) -> str:
    """Write ``values`` as a YAML file at ``path``; returns the path as a string."""
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return str(path)


def save_tiny_shapes_pipeline(folder) -> str:
    """Save at ``folder`` a tiny random causal pipeline (32x32) that reads ShapesWorld captions (a word tokenizer over
    them): the starting model of the RL recipe tests. Returns the folder as a string."""
    import torch

    from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler
    from diffusers_raven.shapes import all_captions
    from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_transformer_config, tiny_vae

    tokenizer = build_word_tokenizer(corpus=all_captions())
    tokenizer.model_max_length = 18
    torch.manual_seed(1)
    transformer = CausalWanTransformer3DModel(**tiny_transformer_config(in_channels=4, text_dim=16, num_layers=1,
                                                                        attention_head_dim=12, ffn_dim=32))
    CausalVideoPipeline(tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer), d_model=16, d_ff=32),
                        transformer=transformer, vae=tiny_vae(z_dim=4, base_dim=8),
                        scheduler=ConsistencyFlowMatchScheduler(), sample_height=32,
                        sample_width=32).save_pretrained(folder)
    return str(folder)
