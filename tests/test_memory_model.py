"""The memory model of benchmarks/memory_model.py (docs/training.md §9): its live-tensor counter counts what is
allocated, its meta-device count of VAE decoding equals the real decoding's, and its prediction of a whole RAVEN and
CM-GRPO run at the tiny size is within 5% of the measured peak. (Both tiny sizes, LoRA, checkpointing, KVPO and two
processes: ``python benchmarks/memory_model.py``, results in benchmarks/results/memory_model.json.)"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory_model as mm  # noqa: E402


def test_live_tensor_counter_counts_allocations_and_frees():
    mem = mm.TensorMemory()
    with mem:
        a = torch.zeros(1000)                    # 4,000 bytes
        b = torch.zeros(500, dtype=torch.float64)  # 4,000 bytes
        view = a[10:20]                          # no new storage
        del b
        c = torch.ones(250)                      # 1,000 bytes
        storage = c.untyped_storage()
        storage.resize_(0)                       # how FSDP2 frees unsharded parameters
    assert mem.peak == 8000
    assert mem.current == 4000 and view.untyped_storage().nbytes() == 4000


def test_meta_count_of_decoding_equals_the_real_decoding():
    from diffusers.video_processor import VideoProcessor

    from diffusers_raven.utils.tiny import tiny_vae

    vae, processor = tiny_vae(z_dim=4), VideoProcessor(vae_scale_factor=8)
    mem = mm.TensorMemory()
    with torch.no_grad(), mem:
        pixels = vae.decode(torch.randn(1, 4, 6, 8, 8), return_dict=False)[0]
        processor.postprocess_video(pixels, output_type="pt")
    del pixels
    assert mm.decode_bytes(vae, (4, 6, 8, 8), processor) == mem.peak


@pytest.fixture(scope="module")
def coefficients():
    return {"causal_fp32": mm.census("causal"), "wan_fp32": mm.census("wan")}


@pytest.mark.parametrize("variant", ["raven", "cmgrpo"])
def test_prediction_is_within_5_percent_of_the_measured_peak(tmp_path, coefficients, variant):
    kind, options = mm.VARIANTS[variant]
    trainer = mm.build(kind, "tiny", str(tmp_path), **options)
    setup = mm.setup_of(trainer)
    measured = mm.measure(trainer)
    predicted = mm.predict(mm.Setup(**{**setup.__dict__, "coefficients": coefficients}))
    assert 0.95 < measured["peak_bytes"] / predicted["peak"] < 1.05
    # the static part: the weights and states the run starts from are counted exactly
    assert measured["start_bytes"] == pytest.approx(
        predicted["static_total"] - predicted["static"]["Adam states"]
        - predicted["static"].get("critic weights + Adam", 0) + 4 * setup.critic_params + setup.critic_buffer_bytes,
        rel=1e-6)
