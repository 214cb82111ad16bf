import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=16,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=64,
)


@pytest.fixture
def tiny_config():
    return dict(TINY_TRANSFORMER)


@pytest.fixture
def causal_model(tiny_config):
    from diffusers_raven import CausalWanTransformer3DModel

    torch.manual_seed(0)
    return CausalWanTransformer3DModel(**tiny_config, num_frames_per_chunk=3).eval()
