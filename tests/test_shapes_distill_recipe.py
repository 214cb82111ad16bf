"""The ShapesWorld distillation recipe (trainers/shapes_distill.py) runs the three history modes end to end on a tiny
random student and teacher, saves loadable pipelines, complete metrics, a table and a plot, resumes a killed run,
and rejects bad configs before training."""

import json
import os
import shutil

import pytest

from recipe_utils import load_recipe, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ["raven", "self_forcing", "diffusion_forcing"]




@pytest.fixture(autouse=True)
def _threads():
    """One thread while the recipe runs (it sets it too); the session's own count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory):
    """Fake stage 3 and 4 outputs: a tiny bidirectional teacher and a causal student pipeline with its weights (a
    word tokenizer over the ShapesWorld captions, a tiny UMT5 encoder, a tiny Wan VAE)."""
    from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler
    from diffusers_raven.shapes import all_captions
    from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_transformer, tiny_vae

    root = tmp_path_factory.mktemp("shapes_stages")
    tokenizer = build_word_tokenizer(corpus=all_captions())
    tokenizer.model_max_length = 18
    text_encoder = tiny_text_encoder(len(tokenizer), d_model=16, d_ff=32)
    teacher = tiny_transformer(seed=1, in_channels=4, text_dim=16, num_layers=1, attention_head_dim=12, ffn_dim=32)
    teacher.save_pretrained(root / "teacher")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = CausalWanTransformer3DModel.from_config({**config, "num_frames_per_chunk": 3})
    student.load_state_dict(teacher.state_dict())
    CausalVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=student,
                        vae=tiny_vae(z_dim=4, base_dim=8), scheduler=ConsistencyFlowMatchScheduler(),
                        sample_height=32, sample_width=32).save_pretrained(root / "student")
    return {"student_path": str(root / "student"), "teacher_path": str(root / "teacher")}


TINY = dict(num_frames=21, height=32, width=32, batch_size=1, num_prompts=4, max_steps=2, time_budget_minutes=10,
            learning_rate=1e-3, critic_learning_rate=1e-3, critic_updates_per_generator_update=1, logging_steps=1,
            save_steps=1, eval_num_videos=1, long_video_factor=2, num_threads=1)


def test_three_modes_end_to_end_and_resume(tmp_path, stage_outputs):
    import torch

    from diffusers_raven import CausalVideoPipeline

    recipe = load_recipe("shapes_distill")
    out = tmp_path / "out"
    config = write_config(tmp_path / "distill.yaml", **stage_outputs, **TINY)
    report = recipe.main(["--config", config, "--output_dir", str(out)])

    start = CausalVideoPipeline.from_pretrained(stage_outputs["student_path"]).transformer.state_dict()
    for mode in MODES:
        pipe = CausalVideoPipeline.from_pretrained(out / f"distill_{mode}")
        weights = pipe.transformer.state_dict()
        assert set(weights) == set(start)
        assert any(not torch.equal(weights[k], start[k]) for k in start), f"{mode} did not change the student"

    metrics = json.loads((out / "distill_metrics.json").read_text())
    assert list(metrics["modes"]) == MODES
    for key in ("config", "command", "budget", "student", "eval_captions", "long_num_frames"):
        assert key in metrics, key
    assert metrics["budget"]["kind"] == "time" and metrics["long_num_frames"] == 45
    for mode, entry in metrics["modes"].items():
        assert entry["generator_steps"] == 2 and entry["stop_reason"] == "max_steps", mode
        assert entry["train_seconds"] > 0 and entry["seconds_per_step"] > 0
        assert [e["step"] for e in entry["loss_curve"]] == [1, 2]
        assert entry["settings"]["mode"] == mode
        assert 0 <= entry["eval"]["train_length"]["semantic_accuracy"] <= 1
        assert len(entry["eval"]["train_length"]["per_chunk"]) == 2  # 21 frames: 2 chunks of 3 latent frames
        assert len(entry["eval"]["long"]["per_chunk"]) == 4
        assert len(entry["drift"]["semantic_accuracy"]) == len(entry["drift"]["psnr"]) == 4
    assert metrics["modes"]["raven"]["chunk_loss_alpha"] == -1.0
    assert metrics["modes"]["self_forcing"]["chunk_loss_alpha"] == 0.0
    assert len(metrics["student"]["drift"]["psnr"]) == 4
    assert (out / "distill_drift.png").stat().st_size > 0
    table = (out / "distill_table.md").read_text()
    assert all(f"| {mode} | 2 |" in table for mode in MODES) and "starting student" in table
    assert report["modes"].keys() == metrics["modes"].keys()

    # without --resume, the outputs of this run are not overwritten
    with pytest.raises(ValueError, match="--resume"):
        recipe.main(["--config", config, "--output_dir", str(out)])

    # a run killed during self_forcing's second step: its last checkpoint is step 1, nothing else of it is saved
    uninterrupted = CausalVideoPipeline.from_pretrained(out / "distill_self_forcing").transformer.state_dict()
    shutil.rmtree(out / "distill_self_forcing")
    shutil.rmtree(out / "distill_self_forcing_run" / "checkpoint-2")
    recipe.main(["--config", config, "--output_dir", str(out), "--resume"])
    metrics = json.loads((out / "distill_metrics.json").read_text())
    resumed = metrics["modes"]["self_forcing"]
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["generator_steps"] == 2
    assert resumed["steps_this_run"] == 1
    assert metrics["modes"]["raven"]["resumed_from"] is None  # finished earlier: skipped, not retrained
    weights = CausalVideoPipeline.from_pretrained(out / "distill_self_forcing").transformer.state_dict()
    assert all(torch.allclose(weights[k], uninterrupted[k], atol=1e-6) for k in weights)  # the same training

    # a resumed run must keep the training settings
    changed = write_config(tmp_path / "changed.yaml", **stage_outputs, **{**TINY, "learning_rate": 1e-4})
    with pytest.raises(ValueError, match="learning_rate"):
        recipe.main(["--config", changed, "--output_dir", str(out), "--resume"])


def test_time_budget_stops_and_carries_over(tmp_path):
    from transformers import TrainerControl, TrainerState

    recipe = load_recipe("shapes_distill")

    class Args:
        output_dir = str(tmp_path)

    state, control = TrainerState(), TrainerControl()
    budget = recipe.TrainingTimeBudget(1e-9)
    budget.on_train_begin(Args, state, control)
    budget.on_step_begin(Args, state, control)
    state.global_step = 1
    budget.on_step_end(Args, state, control)
    assert control.should_training_stop and budget.stopped and budget.elapsed > 0
    (tmp_path / "checkpoint-1").mkdir()
    budget.on_save(Args, state, control)
    resumed = recipe.TrainingTimeBudget(None, str(tmp_path / "checkpoint-1"))
    assert resumed.elapsed == budget.elapsed  # a resumed mode gets what remains of its budget
    control = TrainerControl()
    resumed.on_step_begin(Args, state, control)
    resumed.on_step_end(Args, state, control)
    assert not control.should_training_stop  # None: count only (budget: steps)


def test_bad_configs_fail_before_training(tmp_path, stage_outputs):
    recipe = load_recipe("shapes_distill")
    for values, match in (({"modes": ["raven", "forcing"]}, "unknown history mode 'forcing'"),
                          ({"modes": ["teacher_forcing"]}, "teacher_forcing needs encoded"),
                          ({"modes": ["raven", "raven"]}, "twice"), ({"budget": "flops"}, "budget"),
                          ({"num_frames": 20}, "1 \\+ 4k"), ({"raven_args": {"history": "raven"}}, "set by the recipe"),
                          ({"raven_args": {"bogus": 1}}, "unknown RavenConfig"),
                          ({"bogus": 1}, "unknown keys in the --config file: 'bogus'")):
        with pytest.raises(ValueError, match=match):
            recipe.main(["--config", write_config(tmp_path / "bad.yaml", **stage_outputs, **values),
                         "--output_dir", str(tmp_path / "out")])
    for flags, match in ((["--modes", "raven", "causvid"], "unknown history mode"),  # flags are checked too
                         (["--raven_args", '{"bogus": 1}'], "unknown RavenConfig"),  # raven_args as JSON
                         (["--raven_args", "[1, 2]"], "must be a mapping")):
        with pytest.raises(ValueError, match=match):
            recipe.main(["--config", write_config(tmp_path / "ok.yaml", **stage_outputs), "--output_dir",
                         str(tmp_path / "out"), *flags])
    missing = write_config(tmp_path / "missing.yaml", **{**stage_outputs, "student_path": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="student_path="):
        recipe.main(["--config", missing, "--output_dir", str(tmp_path / "out")])
    missing = write_config(tmp_path / "missing.yaml", **{**stage_outputs, "teacher_path": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="teacher_path="):
        recipe.main(["--config", missing, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing was trained or written
