"""The ShapesWorld KVPO recipe (trainers/shapes_kvpo.py): single-prompt and multi-prompt runs end to end on a tiny
random pipeline, configured through trl.TrlParser (YAML plus flags, misspelt keys refused), with a loadable pipeline,
the reward against training time and the held-out evaluation in its results; the caption schedules."""

import json
import os

import pytest
import torch

from recipe_utils import load_recipe, save_tiny_shapes_pipeline, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_shapes_pipeline(tmp_path_factory.mktemp("kvpo_start") / "start")


# 45 frames = 12 latent frames = 4 chunks; a 9-frame window with 1 sink; 2 branches routed for 1 chunk from chunk 2
# or 3; the schedules switch at frame 33 (chunk 3). Evaluation at 9 frames and 2x that (the recipe's 21 and 93).
TINY = dict(num_prompts=4, max_steps=2, logging_steps=1, save_steps=1, num_frames=45, height=32, width=32,
            window_frames=9, sink_frames=1, num_branches=2, routed_chunks=1, selected_frames=2, recent_frames=4,
            fork_start_chunk=2, switch_frame=33, lora_rank=4, lora_alpha=4, learning_rate=1e-3, beta=1.0,
            eval_num_videos=1, eval_num_frames=9, long_video_factor=2, time_budget_minutes=10, num_threads=1,
            use_cpu=True, disable_tqdm=True, seed=0)


@pytest.mark.parametrize("multi_prompt", [False, True])
def test_shapes_kvpo_end_to_end(tmp_path, tiny_model, multi_prompt):
    from diffusers_raven import CausalVideoPipeline

    recipe = load_recipe("shapes_kvpo")
    config = write_config(tmp_path / "kvpo.yaml", model_path=tiny_model, **TINY)
    out = tmp_path / "out"
    results = recipe.main(["--config", config, "--output_dir", str(out), "--multi_prompt", str(multi_prompt)])
    saved = json.loads((out / "kvpo_results.json").read_text())
    assert saved["steps"] == results["steps"] == 2 and saved["script_args"]["multi_prompt"] is multi_prompt
    assert saved["command"].startswith("python trainers/shapes_kvpo.py --config")
    assert [p["step"] for p in saved["reward_curve"]] == [1, 2]
    for point in saved["reward_curve"]:
        assert point["train_seconds"] > 0 and "rewards/semantic_reward/mean" in point
        assert "kvpo/anchor_reward" in point and "kvpo/local_reward" in point
    assert saved["config"]["reward_weights"] == [1.0, 0.25, 0.25] and saved["config"]["num_branches"] == 2
    assert saved["eval_frames"] == {"train_length": 9, "long": 21}
    for key in ("start_eval", "end_eval"):
        assert saved[key]["train_length"]["num_frames"] == 9 and saved[key]["long"]["num_frames"] == 21
        assert 0 <= saved[key]["train_length"]["semantic_accuracy"] <= 1
    if multi_prompt:
        assert saved["example_schedule"]["switch_frames"] == [33] and len(saved["example_schedule"]["prompt"]) == 2
    start = CausalVideoPipeline.from_pretrained(tiny_model).transformer.state_dict()
    trained = CausalVideoPipeline.from_pretrained(out / "pipeline").transformer.state_dict()
    assert set(start) == set(trained) and any(not torch.equal(start[k], trained[k]) for k in start)
    assert (out / "checkpoint-2" / "reward_clock.json").exists()
    with pytest.raises(SystemExit, match="--resume"):  # finished outputs are not overwritten
        recipe.main(["--config", config, "--output_dir", str(out)])


def test_shapes_kvpo_refuses_unknown_keys(tmp_path, tiny_model):
    recipe = load_recipe("shapes_kvpo")
    config = write_config(tmp_path / "kvpo.yaml", model_path=tiny_model, num_brnaches=2, **TINY)
    with pytest.raises((SystemExit, ValueError), match="num_brnaches"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "out")])
    with pytest.raises((SystemExit, ValueError), match="swich_frame"):
        recipe.main(["--config", write_config(tmp_path / "ok.yaml", model_path=tiny_model, **TINY),
                     "--output_dir", str(tmp_path / "out2"), "--swich_frame", "21"])


def test_caption_schedules_change_one_visible_attribute():
    from diffusers_raven.shapes import HELD_OUT_COMBOS, parse_caption

    recipe = load_recipe("shapes_kvpo")
    schedules = recipe.caption_schedules(12, 0, ["direction", "color"], 64, 64)
    for i, (first, second) in enumerate(schedules):
        a, b = parse_caption(first), parse_caption(second)
        assert a["background"] == b["background"] and len(a["objects"]) == len(b["objects"])
        changed = [(x, y) for x, y in zip(a["objects"], b["objects"]) if x != y]
        assert len(changed) == 1  # one object, one attribute
        (x, y), = changed
        attribute = ["direction", "color"][i % 2]
        assert x[attribute] != y[attribute] and {k: v for k, v in x.items() if k != attribute} == {
            k: v for k, v in y.items() if k != attribute}
        for text in (first, second):  # both captions of the training split
            combos = {(o["shape"], o["color"], o["direction"]) for o in parse_caption(text)["objects"]}
            assert not combos & HELD_OUT_COMBOS
