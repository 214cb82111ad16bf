"""The ShapesWorld RL recipe (trainers/shapes_grpo.py): both samplers run end to end on a tiny random pipeline,
configured through trl.TrlParser (YAML plus flags, misspelt keys refused), with a loadable pipeline, the reward
against training time and the held-out evaluation in its results."""

import json
import os

import pytest
import torch

from recipe_utils import load_recipe, save_tiny_shapes_pipeline, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_shapes_pipeline(tmp_path_factory.mktemp("grpo_start") / "start")


TINY = dict(num_prompts=4, num_generations=2, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
            save_steps=1, num_frames=21, height=32, width=32, lora_rank=4, lora_alpha=4, learning_rate=1e-3,
            eval_num_videos=1, long_video_factor=2, time_budget_minutes=10, num_threads=1, use_cpu=True,
            disable_tqdm=True, seed=0)


@pytest.mark.parametrize("sampler", ["consistency", "sde"])
def test_shapes_grpo_end_to_end(tmp_path, tiny_model, sampler):
    from diffusers_raven import CausalVideoPipeline

    recipe = load_recipe("shapes_grpo")
    config = write_config(tmp_path / "grpo.yaml", model_path=tiny_model, **TINY)
    out = tmp_path / "out"
    results = recipe.main(["--config", config, "--output_dir", str(out), "--sampler", sampler])
    saved = json.loads((out / "grpo_results.json").read_text())
    assert saved["steps"] == results["steps"] == 2 and saved["config"]["sampler"] == sampler
    assert [p["step"] for p in saved["reward_curve"]] == [1, 2]
    assert all("rewards/semantic_reward/mean" in p and p["train_seconds"] > 0 for p in saved["reward_curve"])
    assert saved["config"]["reward_weights"] == [1.0, 0.25, 0.25]
    for key in ("start_eval", "end_eval"):
        assert 0 <= saved[key]["train_length"]["semantic_accuracy"] <= 1 and "long" in saved[key]
    start = CausalVideoPipeline.from_pretrained(tiny_model).transformer.state_dict()
    trained = CausalVideoPipeline.from_pretrained(out / "pipeline").transformer.state_dict()
    assert set(start) == set(trained) and any(not torch.equal(start[k], trained[k]) for k in start)
    with pytest.raises(SystemExit, match="--resume"):  # finished outputs are not overwritten
        recipe.main(["--config", config, "--output_dir", str(out)])


def test_shapes_grpo_refuses_unknown_keys(tmp_path, tiny_model):
    recipe = load_recipe("shapes_grpo")
    config = write_config(tmp_path / "grpo.yaml", model_path=tiny_model, semantc_weight=2.0, **TINY)
    with pytest.raises((SystemExit, ValueError), match="semantc_weight"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "out")])
    with pytest.raises((SystemExit, ValueError), match="num_generatons"):
        recipe.main(["--config", write_config(tmp_path / "ok.yaml", model_path=tiny_model, **TINY),
                     "--output_dir", str(tmp_path / "out2"), "--num_generatons", "4"])


def test_reward_plot_and_window_summary(tmp_path):
    """trainers/shapes_rl_plot.py: one PNG for several runs (CM-GRPO and KVPO results files), and first/last-window
    means checked by hand."""
    plot = load_recipe("shapes_rl_plot")
    folders = []
    for label, slope in (("a", 0.01), ("b", -0.02)):
        curve = [{"step": i, "train_seconds": 60.0 * i, "reward": 0.5 + slope * i,
                  "rewards/semantic_reward/mean": 0.4 + slope * i} for i in range(1, 31)]
        (tmp_path / label).mkdir()
        results_file = "grpo_results.json" if label == "a" else "kvpo_results.json"  # a CM-GRPO and a KVPO run
        (tmp_path / label / results_file).write_text(
            json.dumps({"steps": 30, "train_seconds": 1800.0, "config": {"sampler": label}, "reward_curve": curve}))
        folders.append(f"{label}={tmp_path / label}")
    png, summary = tmp_path / "curves.png", tmp_path / "curves.json"
    result = plot.main([*sum((["--run", f] for f in folders), []), "--output", str(png), "--summary", str(summary),
                        "--window_minutes", "4"])
    assert png.stat().st_size > 1000 and json.loads(summary.read_text())["runs"].keys() == {"a", "b"}
    semantic = result["runs"]["b"]["metrics"]["rewards/semantic_reward/mean"]
    first, last = [0.4 - 0.02 * i for i in range(1, 6)], [0.4 - 0.02 * i for i in range(26, 31)]
    assert semantic["first"] == pytest.approx(sum(first) / 5) and semantic["last"] == pytest.approx(sum(last) / 5)
    assert semantic["change"] == pytest.approx(-0.02 * 25)
    with pytest.raises(SystemExit, match="--run"):
        plot.main(["--run", str(tmp_path / "a"), "--output", str(png)])
