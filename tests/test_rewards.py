"""The optical-flow motion reward and the CLIP text-video reward, checked against known motion and a direct
computation with the transformers CLIP model."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_raven.rewards import (
    dynamic_degree_reward,
    frame_indices,
    make_clip_reward,
    make_motion_reward,
    motion_reward,
    top_flow_magnitude,
)


@pytest.fixture
def cv2():
    cv2 = pytest.importorskip("cv2")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield cv2
    cv2.setNumThreads(threads)


def square_video(height=64, width=64, dx=0, dy=0, frames=6, side=20, seed=0):
    """A randomly textured ``side`` x ``side`` square on a flat grey background, moving ``(dx, dy)`` px per frame."""
    rng = np.random.default_rng(seed)
    texture = rng.random((side, side)).astype(np.float32)
    video = np.full((frames, 3, height, width), 0.5, dtype=np.float32)
    for f in range(frames):
        x, y = 6 + f * dx, 6 + f * dy
        video[f, :, y : y + side, x : x + side] = texture
    return torch.from_numpy(video)


# ------------------------------------------------------------------ motion (dynamic degree)
def test_top_flow_magnitude_on_a_hand_built_flow():
    # 100 vectors (0.6 m, 0.8 m) of magnitudes m = 0..99 in a shuffled 10 x 10 field.
    magnitudes = np.random.default_rng(0).permutation(100).astype(np.float64).reshape(10, 10)
    flow = np.stack([0.6 * magnitudes, 0.8 * magnitudes], axis=-1)
    assert top_flow_magnitude(flow) == pytest.approx((95 + 96 + 97 + 98 + 99) / 5)  # top 5 %: 5 vectors
    assert top_flow_magnitude(flow, 0.1) == pytest.approx(sum(range(90, 100)) / 10)
    assert top_flow_magnitude(flow, 1.0) == pytest.approx(49.5)
    assert top_flow_magnitude(flow, 0.001) == pytest.approx(99.0)  # at least one vector
    assert top_flow_magnitude(torch.from_numpy(flow).float(), 0.05) == pytest.approx(97.0)
    # 3 of 40 vectors: ceil(0.07 * 40) = 3 -> (3 + 4 + 5) / 3 with magnitudes 5, 4, 3 and zeros elsewhere.
    small = np.zeros((5, 8, 2))
    small[0, 0] = (3, 4)
    small[1, 1] = (0, -4)
    small[2, 2] = (-3, 0)
    assert top_flow_magnitude(small, 0.07) == pytest.approx(4.0)


def test_translating_square_gives_its_displacement(cv2):
    prompts = ["a square"]
    static = dynamic_degree_reward(prompts, square_video()[None])
    assert static == [pytest.approx(0.0, abs=1e-6)]
    speeds = [1, 2, 3, 4, 6]
    scores = [dynamic_degree_reward(prompts, square_video(dx=d)[None])[0] for d in speeds]
    for d, score in zip(speeds, scores):
        assert score == pytest.approx(d, abs=0.05)
    assert all(a < b for a, b in zip(scores, scores[1:]))
    # A diagonal motion of (2, 1) px per frame has magnitude sqrt(5).
    assert dynamic_degree_reward(prompts, square_video(dx=2, dy=1)[None])[0] == pytest.approx(math.sqrt(5), abs=0.05)
    # Moving up and left measures the same.
    video = square_video(dx=3, dy=0).flip(0)
    assert dynamic_degree_reward(prompts, video[None])[0] == pytest.approx(3, abs=0.05)


def test_reference_size_makes_resolutions_comparable(cv2):
    raw = make_motion_reward(reference_size=None, name="raw_motion")
    assert raw.__name__ == "raw_motion"
    small = square_video(dx=2)  # 64 x 64, 2 px per frame
    wide = square_video(96, 160, dx=3, side=30)  # shorter side 96, 3 px per frame = 2 px at 64
    large = square_video(128, 128, dx=4, side=40)  # 4 px per frame at 128 = 2 px at 64
    assert dynamic_degree_reward(["a"] * 3, [small, wide, large]) == [pytest.approx(2.0, abs=0.05)] * 3
    assert raw(["a"] * 3, [small, wide, large]) == [pytest.approx(v, abs=0.05) for v in (2.0, 3.0, 4.0)]
    to_32 = make_motion_reward(reference_size=32, name="motion_at_32")
    assert to_32(["a"], [large]) == [pytest.approx(1.0, abs=0.05)]


def test_motion_reward_is_batched_and_leaves_the_videos_alone(cv2):
    videos = torch.stack([square_video(dx=d, seed=d) for d in (0, 1, 3)])
    before = videos.clone()
    batch = dynamic_degree_reward(["a", "b", "c"], videos, extra_column=[1, 2, 3])
    single = [dynamic_degree_reward([p], videos[i : i + 1])[0] for i, p in enumerate("abc")]
    assert batch == single
    assert torch.equal(videos, before) and videos.device.type == "cpu"
    # bfloat16, gradients, numpy arrays and grey (single-channel) videos are accepted.
    grad = videos.clone().requires_grad_(True)
    assert dynamic_degree_reward(["a", "b", "c"], grad) == batch
    assert dynamic_degree_reward(["a", "b", "c"], videos.numpy()) == batch
    assert dynamic_degree_reward(["a"] * 3, videos[:, :, :1]) == pytest.approx(batch, abs=1e-6)
    half = dynamic_degree_reward(["a", "b", "c"], videos.bfloat16())
    assert half == pytest.approx(batch, abs=0.1)
    assert dynamic_degree_reward([], torch.zeros(0, 2, 3, 8, 8)) == []


def test_motion_settings_and_names(cv2):
    assert dynamic_degree_reward.__name__ == "dynamic_degree_reward" != motion_reward.__name__
    video = square_video(dx=3)[None]
    # The moving square covers 400 of 4096 pixels: averaging half of the pixels takes in static background.
    half = make_motion_reward(top_fraction=0.5, name="motion_top_half")
    assert half.__name__ == "motion_top_half"
    assert 0 < half(["a"], video)[0] < dynamic_degree_reward(["a"], video)[0]
    gaussian = make_motion_reward(gaussian_window=True, poly_n=7, poly_sigma=1.5, levels=2, winsize=21)
    assert gaussian(["a"], video)[0] == pytest.approx(3, abs=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_fraction=0), "top_fraction"),
        (dict(top_fraction=1.5), "top_fraction"),
        (dict(reference_size=0), "reference_size"),
        (dict(pyr_scale=1.0), "pyr_scale"),
        (dict(levels=0), "levels"),
        (dict(winsize=2.5), "winsize"),
        (dict(iterations=0), "iterations"),
        (dict(poly_n=6), "poly_n"),
        (dict(poly_sigma=0), "poly_sigma"),
        (dict(gaussian_window="yes"), "gaussian_window"),
        (dict(name=""), "name"),
    ],
)
def test_motion_factory_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_motion_reward(**kwargs)


BAD_VIDEOS = [
    (lambda: torch.rand(2, 3, 8, 8), "videos"),  # 4-D batch
    (lambda: torch.rand(1, 3, 4, 8, 8), r"videos\[0\]"),  # 4 channels
    (lambda: torch.rand(1, 3, 8, 8, 3), r"videos\[0\]"),  # channels last
    (lambda: torch.rand(1, 1, 3, 8, 8), "at least 2"),  # one frame
    (lambda: torch.randint(0, 255, (1, 3, 3, 8, 8), dtype=torch.uint8), "dtype"),
    (lambda: torch.rand(1, 3, 3, 8, 8) * 2 - 1, r"\[0, 1\]"),
    (lambda: torch.full((1, 3, 3, 8, 8), float("nan")), "NaN"),
    (lambda: torch.rand(2, 3, 3, 8, 8), "2 videos"),  # one prompt
    (lambda: "video.mp4", "videos"),
]


@pytest.mark.parametrize("make_videos, match", BAD_VIDEOS)
def test_motion_reward_refuses_bad_videos(cv2, make_videos, match):
    with pytest.raises(ValueError, match=match):
        dynamic_degree_reward(["a"], make_videos())


def test_bad_prompts_and_flows(cv2):
    with pytest.raises(ValueError, match="prompts"):
        dynamic_degree_reward("a", torch.rand(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="prompts"):
        dynamic_degree_reward([3], torch.rand(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="flow"):
        top_flow_magnitude(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="top_fraction"):
        top_flow_magnitude(np.zeros((4, 4, 2)), 0.0)


def test_package_imports_without_opencv_and_says_what_to_install():
    code = (
        "import sys; sys.modules['cv2'] = None\n"
        "import torch\n"
        "from diffusers_raven.rewards import dynamic_degree_reward\n"
        "try:\n"
        "    dynamic_degree_reward(['a'], torch.rand(1, 2, 3, 8, 8))\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "opencv-python-headless" in out.stdout


# ------------------------------------------------------------------ CLIP text-video score
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved with a byte-level BPE tokenizer and a 32 x 32 image processor (nothing downloaded)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("s", "q")]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokens), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def direct_clip_scores(path, prompts, videos, indices):
    """The mean cosine similarity through CLIPProcessor, get_image_features and get_text_features, one video and
    one prompt at a time (no padding), frames made 8-bit as PIL images."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    scores = []
    for prompt, video in zip(prompts, videos):
        frames = np.round(video[indices].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        images = [Image.fromarray(frame) for frame in frames]
        with torch.no_grad():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            image = model.get_image_features(pixel_values=pixels).pooler_output
            text = processor.tokenizer([prompt], truncation=True, max_length=24, return_tensors="pt")
            text = model.get_text_features(input_ids=text["input_ids"]).pooler_output
        scores.append(torch.nn.functional.cosine_similarity(image, text.expand_as(image), dim=-1).mean().item())
    return scores


def test_frame_indices_by_hand():
    assert frame_indices(5, 3) == [0, 2, 4]
    assert frame_indices(6, 4) == [0, 2, 3, 5]  # 0, 5/3, 10/3, 5 rounded
    assert frame_indices(21, 8) == [0, 3, 6, 9, 11, 14, 17, 20]
    assert frame_indices(3, 8) == [0, 1, 2]
    assert frame_indices(4, None) == [0, 1, 2, 3]
    assert frame_indices(7, 1) == [0]
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(5, 0)
    with pytest.raises(ValueError, match="num_video_frames"):
        frame_indices(0, 3)


@pytest.mark.parametrize("num_frames, indices", [(3, [0, 2, 4]), (None, [0, 1, 2, 3, 4]), (1, [0])])
def test_clip_reward_equals_the_model_called_directly(tiny_clip, num_frames, indices):
    videos = torch.rand(2, 5, 3, 40, 48)
    prompts = ["a red circle", "sq"]
    reward = make_clip_reward(tiny_clip, num_frames=num_frames)
    assert reward.__name__ == "clip_reward"
    expected = direct_clip_scores(tiny_clip, prompts, videos, indices)
    assert reward(prompts, videos) == pytest.approx(expected, abs=1e-5)
    assert all(-1 <= v <= 1 for v in expected) and expected[0] != pytest.approx(expected[1], abs=1e-4)


def test_clip_reward_scales(tiny_clip):
    from transformers import CLIPConfig

    videos = torch.rand(1, 4, 3, 32, 32)
    cosine = direct_clip_scores(tiny_clip, ["a red circle"], videos, [0, 1, 2, 3])[0]
    assert make_clip_reward(tiny_clip, scale=100.0)(["a red circle"], videos)[0] == pytest.approx(100 * cosine, abs=1e-3)
    # The random model keeps the configured initial logit scale: exp(logit_scale_init_value).
    factor = math.exp(CLIPConfig.from_pretrained(tiny_clip).logit_scale_init_value)
    value = make_clip_reward(tiny_clip, scale="logit_scale")(["a red circle"], videos)[0]
    assert value == pytest.approx(factor * cosine, abs=1e-4)


def test_clip_reward_is_batched(tiny_clip):
    reward = make_clip_reward(tiny_clip, num_frames=2, name="clip_two_frames")
    assert reward.__name__ == "clip_two_frames"
    long_prompt = "a red circle " * 20  # longer than the 24 text positions: truncated
    prompts = ["a red circle", "sq", long_prompt]
    videos = torch.rand(3, 6, 3, 36, 36)
    before = videos.clone()
    batch = reward(prompts, videos, other_column=[0, 1, 2])
    single = [reward([p], videos[i : i + 1])[0] for i, p in enumerate(prompts)]
    assert batch == pytest.approx(single, abs=1e-5)
    assert batch == pytest.approx(direct_clip_scores(tiny_clip, prompts, videos, [0, 5]), abs=1e-5)
    assert torch.equal(videos, before) and videos.device.type == "cpu"
    # Videos of different lengths and sizes in a list; a grey video scores as its RGB copy.
    mixed = [videos[0], torch.rand(3, 3, 20, 28)]
    assert reward(prompts[:2], mixed)[0] == pytest.approx(batch[0], abs=1e-5)
    grey = torch.rand(1, 4, 1, 32, 32)
    assert reward(["sq"], grey) == pytest.approx(reward(["sq"], grey.expand(-1, -1, 3, -1, -1)), abs=1e-6)
    assert reward([], torch.zeros(0, 2, 3, 8, 8)) == []


def test_clip_model_is_loaded_once_and_lazily(tiny_clip, monkeypatch):
    from transformers import CLIPModel

    missing = make_clip_reward(str(tiny_clip / "missing"))  # nothing is read yet
    with pytest.raises(OSError):
        missing(["a"], torch.rand(1, 2, 3, 16, 16))
    loads = []
    original = CLIPModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(counting))
    reward = make_clip_reward(tiny_clip, dtype="float32")
    assert loads == []
    reward(["a"], torch.rand(1, 2, 3, 16, 16))
    reward(["b"], torch.rand(1, 2, 3, 16, 16))
    assert loads == [str(tiny_clip)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_name_or_path=""), "model_name_or_path"),
        (dict(num_frames=0), "num_frames"),
        (dict(scale=-1.0), "scale"),
        (dict(scale="logits"), "scale"),
        (dict(dtype="float99"), "dtype"),
        (dict(device="nowhere"), "device"),
        (dict(name=""), "name"),
        (dict(load_kwargs=["revision"]), "load_kwargs"),
    ],
)
def test_clip_factory_refuses_bad_settings(tiny_clip, kwargs, match):
    kwargs = {"model_name_or_path": tiny_clip, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_clip_reward(**kwargs)


@pytest.mark.parametrize("make_videos, match", [item for item in BAD_VIDEOS if item[1] != "at least 2"])
def test_clip_reward_refuses_bad_videos(tiny_clip, make_videos, match):
    with pytest.raises(ValueError, match=match):
        make_clip_reward(tiny_clip)(["a"], make_videos())
