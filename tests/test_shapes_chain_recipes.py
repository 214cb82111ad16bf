"""The ShapesWorld teacher and student recipes (trainers/shapes_teacher.py, trainers/shapes_student.py) run end to
end on tiny configs, with a tiny text stack and VAE built here, and save loadable models and complete metrics."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from recipe_utils import TRAINERS, load_recipe, write_config


@pytest.fixture(autouse=True)
def _restore_threads():
    """The recipes set torch's thread count; give the rest of the session its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A word tokenizer over every one-object caption, a tiny frozen UMT5 encoder and a tiny Wan VAE."""
    from diffusers_raven.shapes import all_captions
    from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_vae

    root = tmp_path_factory.mktemp("shapes_inputs")
    tokenizer = build_word_tokenizer(corpus=all_captions())
    tokenizer.model_max_length = 18
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_text_encoder(len(tokenizer), d_model=16, d_ff=32).save_pretrained(root / "text_encoder")
    tiny_vae(z_dim=4, base_dim=8).save_pretrained(root / "vae")
    return {"tokenizer_path": str(root / "tokenizer"), "text_encoder_path": str(root / "text_encoder"),
            "vae_path": str(root / "vae")}


TINY_TEACHER = dict(num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=48, freq_dim=16,
                    num_frames=9, height=32, width=32, batch_size=2, fresh_videos_per_step=1, latent_pool_size=2,
                    warmup_steps=0, log_every_steps=1, checkpoint_every_steps=1, eval_every_steps=0,
                    eval_num_videos=1, eval_num_steps=2, num_threads=1)


def test_teacher_then_student(tmp_path, inputs):
    from diffusers import WanTransformer3DModel

    from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel

    out = tmp_path / "out"
    teacher_recipe = load_recipe("shapes_teacher")
    config = write_config(tmp_path / "teacher.yaml", **inputs, **TINY_TEACHER, max_steps=2)
    teacher_recipe.main(["--config", config, "--output_dir", str(out)])
    # resume from the checkpoint for one more step
    config = write_config(tmp_path / "teacher.yaml", **inputs, **TINY_TEACHER, max_steps=3)
    results = teacher_recipe.main(["--config", config, "--output_dir", str(out), "--resume", "last"])

    teacher = WanTransformer3DModel.from_pretrained(out / "teacher")
    assert teacher.config.in_channels == 4 and teacher.config.text_dim == 16 and teacher.config.num_layers == 1
    metrics = json.loads((out / "teacher_metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 3 and metrics["resumed_from"]["step"] == 2
    assert [e["step"] for e in metrics["loss_curve"]] == [1, 2, 3]
    # the resumed step follows this run's schedule (3 steps, cosine to 0.1 of 3e-4), not the 2-step run's
    assert metrics["loss_curve"][-1]["lr"] == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 3))))
    assert metrics["train_scenes_rendered"] == 2 + 1 + 1  # the first step fills the pool with one batch
    for key in ("config", "command", "vae_reference", "evals", "train_wall_seconds", "seconds_per_step",
                "num_parameters", "final_eval"):
        assert key in metrics, key
    assert metrics["evals"][-1]["step"] == 3 and 0 <= metrics["evals"][-1]["semantic_accuracy"] <= 1
    sensitivity = metrics["evals"][-1]["caption_sensitivity"]
    assert sensitivity["sigmas"] == [0.9, 0.7, 0.5, 0.3] and sensitivity["num_samples"] == 1
    assert set(sensitivity["gap"]) == {"background", "color", "shape", "direction", "speed", "empty"}
    assert results["steps"] == 3
    # the checkpoint's EMA, exported without training, is the saved teacher
    info = teacher_recipe.main(["--config", config, "--output_dir", str(out), "--export_ema", str(tmp_path / "ema")])
    assert info["step"] == 3 and json.loads((tmp_path / "ema" / "snapshot.json").read_text())["step"] == 3
    exported = WanTransformer3DModel.from_pretrained(tmp_path / "ema").state_dict()
    assert all(exported[k].equal(v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="--resume"):
        teacher_recipe.main(["--config", config, "--output_dir", str(tmp_path / "none"), "--export_ema", "x"])
    # init_from: a fine-tuning run starts from the saved teacher (unchanged here by a zero learning rate)
    tuned = write_config(tmp_path / "tuned.yaml", **inputs, **TINY_TEACHER, max_steps=1, learning_rate=0.0,
                         init_from=str(out / "teacher"))
    teacher_recipe.main(["--config", tuned, "--output_dir", str(tmp_path / "tuned")])
    start = WanTransformer3DModel.from_pretrained(tmp_path / "tuned" / "teacher").state_dict()
    assert all(start[k].equal(v) for k, v in teacher.state_dict().items())
    wider = write_config(tmp_path / "wider.yaml", **inputs, **{**TINY_TEACHER, "num_layers": 2}, max_steps=1,
                         init_from=str(out / "teacher"))
    with pytest.raises(ValueError, match="init_from=.*num_layers"):
        teacher_recipe.main(["--config", wider, "--output_dir", str(tmp_path / "wider")])

    student_recipe = load_recipe("shapes_student")
    config = write_config(
        tmp_path / "student.yaml", **inputs, teacher_path=str(out / "teacher"), num_ode_pairs=2, ode_num_steps=4,
        num_frames=9, height=32, width=32, batch_size=2, max_steps=2, warmup_steps=0, logging_steps=1, save_steps=0,
        eval_num_videos=1, long_video_factor=2, eval_before_training=False, num_threads=1,
    )
    student_recipe.main(["--config", config, "--output_dir", str(out)])

    pipe = CausalVideoPipeline.from_pretrained(out / "student")
    assert isinstance(pipe.transformer, CausalWanTransformer3DModel)
    assert pipe.transformer.config.num_frames_per_chunk == 3
    assert set(pipe.transformer.state_dict()) == set(teacher.state_dict())
    metrics = json.loads((out / "student_metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 2 and metrics["ode_pairs"] == 2
    assert metrics["eval_chunk_frames"] == [9, 12] and metrics["long_num_frames"] == 21
    assert metrics["few_step_sigmas"] == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])  # METHOD §1
    assert [e["step"] for e in metrics["loss_curve"]] == [1, 2]
    for key in ("config", "command", "eval_teacher", "eval_after", "train_wall_seconds", "seconds_per_step"):
        assert key in metrics, key
    assert len(metrics["eval_after"]["train_length"]["per_chunk"]) == 1
    assert len(metrics["eval_after"]["long"]["per_chunk"]) == 2  # 9 + 12 frames


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def kill_at_call(module, name, call):
    """Wrap ``module.<name>`` so that its ``call``-th call raises :class:`Killed`."""
    original, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            raise Killed(f"{name} call {call}")
        return original(*args, **kwargs)

    return wrapper


def test_teacher_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, inputs, monkeypatch):
    """A run killed in step 4, after its step-3 checkpoint (and with no end-of-run save), then ``--resume last``,
    ends with the weights, EMA, loss curve and rendered scenes of the same run never stopped. The learning rates of
    the uninterrupted run are the warm-up + cosine schedule computed here."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    recipe = load_recipe("shapes_teacher")
    values = {**inputs, **TINY_TEACHER, "batch_size": 2, "fresh_videos_per_step": 1, "latent_pool_size": 3,
              "latent_sampling": "sample", "caption_dropout": 0.5, "warmup_steps": 2, "min_lr_ratio": 0.1,
              "learning_rate": 1e-3, "checkpoint_every_steps": 3, "eval_sensitivity_sigmas": [], "max_steps": 6}
    config = write_config(tmp_path / "teacher.yaml", **values)
    whole = recipe.main(["--config", config, "--output_dir", str(tmp_path / "whole")])

    monkeypatch.setattr(recipe, "flow_matching_loss", kill_at_call(recipe, "flow_matching_loss", 4))
    with pytest.raises(Killed):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "killed")])
    monkeypatch.undo()
    checkpoints = sorted(os.listdir(tmp_path / "killed" / "teacher_checkpoints"))
    assert checkpoints == ["checkpoint-3"]
    resumed = recipe.main(["--config", config, "--output_dir", str(tmp_path / "killed"), "--resume", "last"])

    assert resumed["resumed_from"]["step"] == 3 and resumed["this_run_steps"] == 3
    assert [e["step"] for e in resumed["loss_curve"]] == [e["step"] for e in whole["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr"):
        assert [e[key] for e in resumed["loss_curve"]] == [e[key] for e in whole["loss_curve"]], key
    assert resumed["train_scenes_rendered"] == whole["train_scenes_rendered"] == 2 + 5
    for a, b in zip(resumed["evals"], whole["evals"]):
        assert a["step"] == b["step"] and a["semantic_accuracy"] == b["semantic_accuracy"] and a["psnr"] == b["psnr"]
    ema = {run: WanTransformer3DModel.from_pretrained(tmp_path / run / "teacher").state_dict()
           for run in ("whole", "killed")}
    assert all(torch.equal(ema["killed"][k], v) for k, v in ema["whole"].items())
    trained = {run: load_file(tmp_path / run / "teacher_checkpoints" / "checkpoint-6" / "model.safetensors")
               for run in ("whole", "killed")}
    assert all(torch.equal(trained["killed"][k], v) for k, v in trained["whole"].items())
    assert any(not torch.equal(ema["whole"][k], v) for k, v in trained["whole"].items())  # the EMA is not the model

    def lr(step):  # the schedule before step `step` (0-based): warm-up from 0, then cosine to 0.1 of the peak
        if step < 2:
            return 1e-3 * step / 2
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (6 - 2))))

    assert [e["lr"] for e in whole["loss_curve"]] == pytest.approx([lr(s) for s in range(6)], rel=1e-12, abs=1e-15)


# Runs a recipe script as ``__main__`` (as ``python script ...`` would) and then saves the weights its optimizer
# trained, one file per torchrun rank: ``python RANK_WEIGHTS SCRIPT OUT_DIR ARGS...``.
RANK_WEIGHTS = """
import os, runpy, sys
import torch

optimizers = []


class RecordedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        optimizers.append(self)


torch.optim.AdamW = RecordedAdamW
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
weights = [p.detach().clone() for group in optimizers[0].param_groups for p in group["params"]]
torch.save(weights, os.path.join(out, "weights_rank" + os.environ["RANK"] + ".pt"))
"""


def test_teacher_on_two_processes_takes_the_single_process_steps(tmp_path, inputs):
    """torchrun with 2 CPU processes (gloo) trains the teacher one process would train on the same batches: each rank
    encodes half the fresh videos and computes half the batch, gradients and loss are averaged. The two ranks end
    with identical trained weights; two steps on 2 processes (with the step-2 evaluation shared out between them),
    then a third step resumed in one process, match three steps in one process: loss curve, evaluation, rendered
    scenes and weights (up to the order of float sums)."""
    import torch
    from diffusers import WanTransformer3DModel

    values = {**inputs, **TINY_TEACHER, "batch_size": 4, "fresh_videos_per_step": 2, "latent_pool_size": 6,
              "latent_sampling": "sample", "caption_dropout": 0.5, "warmup_steps": 0, "min_lr_ratio": 1.0,
              "eval_every_steps": 2, "eval_num_videos": 2, "eval_batch_size": 1}
    config = write_config(tmp_path / "teacher.yaml", **values, max_steps=3)
    one = load_recipe("shapes_teacher").main(["--config", config, "--output_dir", str(tmp_path / "one")])

    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two_config = write_config(tmp_path / "two.yaml", **values, max_steps=2)
    (tmp_path / "rank_weights.py").write_text(RANK_WEIGHTS)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), str(tmp_path / "rank_weights.py"),
                    os.path.join(TRAINERS, "shapes_teacher.py"), str(tmp_path), "--config", two_config,
                    "--output_dir", str(tmp_path / "two")], check=True, env=env, timeout=600)
    ranks = [torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*ranks))
    two = json.loads((tmp_path / "two" / "teacher_metrics.json").read_text())
    assert two["world_size"] == 2 and two["command"].startswith("torchrun --nproc_per_node 2 ")
    assert two["finished"] and two["steps"] == 2 and two["cores_used"] == 2
    resumed = load_recipe("shapes_teacher").main(["--config", config, "--output_dir", str(tmp_path / "two"),
                                                  "--resume", "last"])

    assert [e["step"] for e in resumed["loss_curve"]] == [e["step"] for e in one["loss_curve"]] == [1, 2, 3]
    assert [e["loss"] for e in resumed["loss_curve"]] == pytest.approx([e["loss"] for e in one["loss_curve"]],
                                                                       rel=1e-5)
    assert [e["step"] for e in resumed["evals"]] == [e["step"] for e in one["evals"]] == [2, 3]
    for a, b in zip(resumed["evals"], one["evals"]):  # step 2 was sampled by the two ranks, one batch each
        for key in ("semantic_accuracy", "psnr", "consistency"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
        for name, gaps in b["caption_sensitivity"]["gap"].items():  # rank 0's EMA is the one-process EMA
            assert a["caption_sensitivity"]["gap"][name] == pytest.approx(gaps, rel=1e-3, abs=1e-6), name
    assert resumed["train_scenes_rendered"] == one["train_scenes_rendered"] == 4 + 2 + 2
    a = WanTransformer3DModel.from_pretrained(tmp_path / "two" / "teacher").state_dict()
    b = WanTransformer3DModel.from_pretrained(tmp_path / "one" / "teacher").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst < 1e-5, worst
    recipe = load_recipe("shapes_teacher")
    loaded = recipe.load_config(config)
    torch.manual_seed(loaded.model_seed)
    start = WanTransformer3DModel(**recipe.teacher_config(loaded, 4, 16)).state_dict()
    assert max((b[k] - start[k]).abs().max().item() for k in b) > 1e3 * worst  # the steps did move the weights


def test_teacher_compiled_training_takes_the_eager_steps(tmp_path, inputs):
    """``compile: true`` trains through ``torch.compile`` (inductor) and gives the eager run's losses and weights (up
    to the order of float operations in the generated kernels)."""
    import torch._dynamo
    from diffusers import WanTransformer3DModel

    recipe = load_recipe("shapes_teacher")
    runs, graphs = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        config = write_config(tmp_path / f"{compiled}.yaml", **inputs, **TINY_TEACHER, max_steps=2, compile=compiled)
        runs[compiled] = recipe.main(["--config", config, "--output_dir", str(tmp_path / str(compiled))])
        graphs[compiled] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == {False: 0, True: graphs[True]} and graphs[True] >= 1  # only the compiled run went through dynamo
    assert [e["loss"] for e in runs[True]["loss_curve"]] == pytest.approx(
        [e["loss"] for e in runs[False]["loss_curve"]], rel=1e-4)
    a, b = (WanTransformer3DModel.from_pretrained(tmp_path / str(c) / "teacher").state_dict() for c in (True, False))
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-5


def test_teacher_processes_must_divide_the_batch(tmp_path, inputs, monkeypatch):
    """A number of processes that does not divide ``batch_size`` (or ``fresh_videos_per_step``) is refused naming it,
    before any process group is needed."""
    recipe = load_recipe("shapes_teacher")
    monkeypatch.setattr(recipe, "distributed_world", lambda: (0, 3))
    config = write_config(tmp_path / "t.yaml", **inputs, **TINY_TEACHER, max_steps=1)
    with pytest.raises(ValueError, match="batch_size=2 must be a multiple of the number of processes \\(3\\)"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "out")])
    monkeypatch.setattr(recipe, "distributed_world", lambda: (0, 2))  # batch_size 2, fresh_videos_per_step 1
    with pytest.raises(ValueError, match="fresh_videos_per_step=1 must be a multiple"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "out")])


def test_teacher_patch_size_sets_the_token_grid_and_bad_sizes_name_it(tmp_path, inputs):
    """``patch_size`` is the transformer's spatial patch (its saved config says so, and the student inherits it); a
    video size that is no multiple of the VAE factor x patch is refused naming ``patch_size``."""
    from diffusers import WanTransformer3DModel

    teacher_recipe = load_recipe("shapes_teacher")
    config = write_config(tmp_path / "teacher.yaml", **inputs, **TINY_TEACHER, patch_size=4, max_steps=1)
    teacher_recipe.main(["--config", config, "--output_dir", str(tmp_path / "out")])
    teacher = WanTransformer3DModel.from_pretrained(tmp_path / "out" / "teacher")
    assert tuple(teacher.config.patch_size) == (1, 4, 4)
    assert teacher.patch_embedding.weight.shape[1:] == (4, 1, 4, 4)  # z_dim 4 in, one latent frame x 4 x 4
    student = load_recipe("shapes_student").causal_student(teacher, 3)
    assert tuple(student.config.patch_size) == (1, 4, 4)
    config = write_config(tmp_path / "bad.yaml", **inputs, **{**TINY_TEACHER, "height": 48}, patch_size=4, max_steps=1)
    with pytest.raises(ValueError, match="patch_size 4"):  # the tiny VAE is 8x: 48 is no multiple of 32
        teacher_recipe.main(["--config", config, "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="patch_size"):
        teacher_recipe.load_config(write_config(tmp_path / "t.yaml", patch_size=0))


def test_student_starts_as_the_teacher():
    """The causal student has the teacher's config and weights; on one chunk (no history) it predicts the same."""
    import torch

    from diffusers_raven.utils.tiny import tiny_transformer

    student_recipe = load_recipe("shapes_student")
    teacher = tiny_transformer(seed=3)
    student = student_recipe.causal_student(teacher, 3).eval()
    x, t, text = torch.randn(1, 4, 3, 4, 4), torch.tensor([700.0]), torch.randn(1, 8, 32)
    with torch.no_grad():
        assert torch.allclose(student(x, t, text).sample, teacher(x, t, text).sample, atol=1e-5)


def test_bad_configs_raise(tmp_path):
    teacher_recipe = load_recipe("shapes_teacher")
    student_recipe = load_recipe("shapes_student")
    for values, match in (({"num_frames": 20}, "1 \\+ 4k"), ({"attention_head_dim": 21}, "rotary"),
                          ({"sigma_sampling": "uniform"}, "sigma_sampling"), ({"caption_dropout": 1.0}, "dropout"),
                          ({"fresh_videos_per_step": 9}, "fresh"), ({"bogus": 1}, "unknown")):
        with pytest.raises(ValueError, match=match):
            teacher_recipe.load_config(write_config(tmp_path / "t.yaml", **values))
    for values, match in (({"num_frames": 17}, "chunks"), ({"ode_num_steps": 30}, "multiple of 4")):
        with pytest.raises(ValueError, match=match):
            student_recipe.load_config(write_config(tmp_path / "s.yaml", **values))
    with pytest.raises(ValueError, match="not a folder"):
        teacher_recipe.load_frozen_inputs(teacher_recipe.ShapesTeacherConfig(vae_path=str(tmp_path / "none")))
