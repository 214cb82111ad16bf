"""The bounded prompt-embedding cache and streaming prompt sets: least recently used out, padding dropped and restored
bit for bit, the states the text encoder gives, the size logged; a streaming ``datasets.IterableDataset`` is served in
the order TRL's ``RepeatSampler`` serves a map-style dataset. (Two processes with FSDP: tests/test_fsdp.py.)"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from tiny_raven import build  # noqa: E402

from diffusers_raven.trainer.prompt_cache import PromptEmbeddingCache, RepeatedPromptStream  # noqa: E402


def test_least_recently_used_prompts_leave_first():
    """Against a plain list kept in recency order (an independent LRU)."""
    cache = PromptEmbeddingCache(3)
    recency: list[str] = []
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        prompt = f"p{int(torch.randint(0, 6, (), generator=g))}"
        states = torch.full((4, 2), float(step + 1))
        if cache.get(prompt) is None:
            cache.put(prompt, states)
        if prompt in recency:
            recency.remove(prompt)
        recency.append(prompt)
        recency = recency[-3:]
        assert [p for p in recency if p in cache] == recency and len(cache) == len(recency)
    assert cache.hits + cache.misses == 60 and cache.evictions == cache.misses - 3


def test_padding_is_dropped_and_restored_exactly():
    cache = PromptEmbeddingCache(None)
    states = torch.zeros(16, 8)
    states[:5] = torch.randn(5, 8)
    states[2] = 0.0  # an inner zero row is kept
    cache.put("a", states)
    assert cache.nbytes == 5 * 8 * 4
    assert torch.equal(cache.get("a"), states)
    cache.put("empty", torch.zeros(16, 8))
    assert torch.equal(cache.get("empty"), torch.zeros(16, 8)) and cache.nbytes == 5 * 8 * 4
    assert PromptEmbeddingCache(0).put("a", states) is None and len(PromptEmbeddingCache(0)) == 0
    with pytest.raises(ValueError, match="max_prompts"):
        PromptEmbeddingCache(-1)


def test_trainer_cache_is_bounded_and_returns_the_encoders_states(tmp_path):
    """30 distinct prompts through a 4-prompt cache: never more than 4 kept, each kept prompt stored as its token rows
    (the tokenizer's count), and every call returns what the text encoder gives for the prompt alone."""
    trainer = build(str(tmp_path), "raven", prompt_cache_size=4)
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow", "white", "black")
               for s in ("circle", "square", "triangle", "star", "heart")]
    pipe = trainer.pipeline
    for start in range(0, len(prompts), 3):
        batch = prompts[start : start + 3] + [prompts[0]]
        states = trainer.encode_prompts(batch)
        assert len(trainer.prompt_cache) <= 4
        for prompt, row in zip(batch, states):
            alone = pipe.encode_prompt([prompt], max_sequence_length=16, device="cpu")[0][0]
            assert torch.allclose(row, alone, atol=1e-6)
    kept = [p for p in prompts if p in trainer.prompt_cache]
    from diffusers_raven.utils.text import clean_prompt

    tokens = pipe.tokenizer([clean_prompt(p) for p in kept], max_length=16, truncation=True).input_ids
    dim = pipe.text_encoder.config.d_model
    assert trainer.prompt_cache.nbytes == sum(min(len(t), 16) for t in tokens) * dim * 4
    assert trainer.prompt_cache.device == torch.device("cpu")


def test_cache_size_is_logged(tmp_path):
    trainer = build(str(tmp_path), "raven", max_steps=1, save_steps=10, prompt_cache_size=8)
    trainer.train()
    logged = trainer.state.log_history[0]
    # logged after the generation batch: its one prompt (the loss then adds the teacher's negative prompt "")
    (drawn,) = [p for p in trainer.prompt_cache._entries if p]
    assert logged["prompt_cache/prompts"] == 1
    tokens = len(trainer.pipeline.tokenizer(drawn).input_ids)
    dim = trainer.pipeline.text_encoder.config.d_model
    assert logged["prompt_cache/megabytes"] == pytest.approx(tokens * dim * 4 / 2**20)


@pytest.mark.parametrize("overrides,match", [
    (dict(prompt_cache_size=-1), "prompt_cache_size"),
    (dict(prompt_cache_size=1.5), "prompt_cache_size"),
    (dict(prompt_cache_device="cuda:3"), "prompt_cache_device"),
])
def test_bad_cache_config(tmp_path, overrides, match):
    from diffusers_raven import RavenConfig

    with pytest.raises(ValueError, match=match):
        RavenConfig(output_dir=str(tmp_path), **overrides)


def test_stream_order_is_the_repeat_samplers():
    """Unshuffled, the stream yields the rows TRL's RepeatSampler indexes: blocks of `unique` rows, each row
    `mini_repeat` times, each block `repeat` times, the incomplete last block dropped."""
    from trl.trainer.utils import RepeatSampler

    rows = [{"prompt": f"p{i}"} for i in range(11)]
    sampler = RepeatSampler(rows, mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=False)
    stream = RepeatedPromptStream(rows, unique=3, mini_repeat=2, repeat=2)
    assert [r["prompt"] for r in stream] == [rows[i]["prompt"] for i in sampler]


def test_streaming_dataset_trains_like_the_map_style_run(tmp_path):
    """One process: the prompts a map-style run drew, streamed in that order from a `datasets.IterableDataset` of
    unknown features, train the same weights (2 micro-steps per generation batch, 3 steps)."""
    from datasets import IterableDataset

    config = dict(max_steps=3, save_steps=10, steps_per_generation=2, per_device_train_batch_size=1)
    straight = build(str(tmp_path / "map"), "raven", **config)
    drawn = []
    generate = straight._generate
    straight._generate = lambda inputs: (drawn.extend(inputs["prompt"]), generate(inputs))[1]
    straight.train()

    def rows(prompts):
        yield from ({"prompt": p} for p in prompts)

    stream = IterableDataset.from_generator(rows, gen_kwargs={"prompts": drawn})
    assert stream.column_names is None  # features unknown: the trainer looks at the first row
    streamed = build(str(tmp_path / "stream"), "raven", train_dataset=stream, prompt_cache_size=1, **config)
    streamed.train()
    for a, b in zip(straight.student.parameters(), streamed.student.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_streaming_datasets(tmp_path):
    from datasets import IterableDataset

    def rows():
        yield {"text": "a red circle"}

    with pytest.raises(ValueError, match="prompt"):
        build(str(tmp_path), "raven", train_dataset=IterableDataset.from_generator(rows))
    trainer = build(str(tmp_path), "raven")
    with pytest.raises(TypeError, match="eval_dataset"):
        type(trainer)(model=trainer.pipeline, teacher=trainer.teacher, args=trainer.args,
                      train_dataset=trainer.train_dataset, eval_dataset=trainer.train_dataset.to_iterable_dataset(),
                      reward_funcs=[lambda prompts, videos, **kw: [0.0] * len(prompts)])
