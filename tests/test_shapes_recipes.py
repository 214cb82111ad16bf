"""The ShapesWorld recipes in trainers/ run end to end on tiny configs and save loadable components."""

import json
import os

import pytest

from recipe_utils import load_recipe, write_config


def test_shapes_text_recipe(tmp_path):
    from transformers import AutoTokenizer, UMT5EncoderModel

    from diffusers_raven.shapes import all_captions

    config = write_config(tmp_path / "text.yaml", d_model=16, d_ff=32, num_two_object_captions=20)
    results = load_recipe("shapes_text").main(["--config", config, "--output_dir", str(tmp_path / "out")])

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(tmp_path / "out" / "text_encoder")
    assert encoder.config.d_model == 16
    assert tokenizer.model_max_length == results["max_sequence_length"]
    captions = all_captions(1) + all_captions(2, background="black")[::1000]
    ids = tokenizer(captions)["input_ids"]
    assert max(len(x) for x in ids) == results["max_sequence_length"]
    assert not any(tokenizer.unk_token_id in x for x in ids)
    assert results["caption_words_with_unk"] == [] and set(results["captions_with_unk"].values()) == {0}
    assert results["min_pairwise_l2"] > 0 and results["reload_max_abs_diff"] == 0
    on_disk = json.loads((tmp_path / "out" / "text_metrics.json").read_text())
    for key in ("config", "command", "vocab_size", "max_sequence_length", "min_pairwise_l2", "captions_with_unk"):
        assert key in on_disk, key


def test_recipe_flags_reach_the_config_and_typos_are_named(tmp_path):
    """Flags override YAML fields as in TRL's scripts (recorded in the metrics file, command included); a misspelt
    key in the file or on the command line is refused naming it and the closest field."""
    config = write_config(tmp_path / "text.yaml", d_model=16, d_ff=32, num_two_object_captions=20)
    recipe = load_recipe("shapes_text")
    results = recipe.main(["--config", config, "--output_dir", str(tmp_path / "out"),
                           "--num_two_object_captions", "7", "--sample_seed", "3"])
    assert results["config"]["num_two_object_captions"] == 7 and results["config"]["sample_seed"] == 3
    assert results["config"]["d_model"] == 16  # from the file
    assert results["num_two_object_captions_tokenized"] == 7
    assert "--num_two_object_captions 7" in results["command"]
    with pytest.raises(ValueError, match="unknown arguments: '--sampel_seed' \\(did you mean '--sample_seed'\\?\\)"):
        recipe.main(["--config", config, "--sampel_seed", "3"])
    typo = write_config(tmp_path / "typo.yaml", d_model=16, sampel_seed=3)
    with pytest.raises(ValueError, match="--config file: 'sampel_seed' \\(did you mean 'sample_seed'\\?\\)"):
        recipe.main(["--config", typo])


def test_shapes_vae_recipe(tmp_path):
    import torch
    from diffusers import AutoencoderKLWan

    config = write_config(
        tmp_path / "vae.yaml",
        z_dim=4,
        base_dim=8,
        dim_mult=[1, 1, 1, 1],
        num_frames=5,
        batch_size=1,
        crop_size=32,
        max_steps=2,
        warmup_steps=1,
        eval_num_clips=1,
        eval_num_frames=5,
        stats_num_clips=2,
        num_threads=1,
    )
    results = load_recipe("shapes_vae").main(["--config", config, "--output_dir", str(tmp_path / "out")])

    vae = AutoencoderKLWan.from_pretrained(tmp_path / "out" / "vae")
    assert vae.config.z_dim == 4
    assert vae.config.latents_mean == pytest.approx(results["latents_mean"])
    assert vae.config.latents_std == pytest.approx(results["latents_std"])
    assert all(std > 0 for std in vae.config.latents_std)
    with torch.no_grad():
        video = vae.decode(torch.zeros(1, 4, 2, 8, 8)).sample
    assert video.shape == (1, 3, 5, 64, 64)
    assert (tmp_path / "out" / "vae_reconstruction.png").exists()

    on_disk = json.loads((tmp_path / "out" / "vae_metrics.json").read_text())
    assert on_disk["finished"] and on_disk["steps"] == 2 and on_disk["stop_reason"] == "max_steps"
    assert [point["step"] for point in on_disk["eval_curve"]] == [0, 2]
    for key in ("config", "command", "final_psnr", "initial_psnr", "train_wall_seconds", "train_curve"):
        assert key in on_disk, key


def test_shapes_vae_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """A VAE run killed in step 4, after its step-3 checkpoint, then ``--resume last``, ends with the weights, latent
    statistics and curves of the same run never stopped; a run under torchrun is refused naming the launch."""
    import torch
    from diffusers import AutoencoderKLWan

    recipe = load_recipe("shapes_vae")
    config = write_config(tmp_path / "vae.yaml", z_dim=4, base_dim=8, dim_mult=[1, 1, 1, 1], num_frames=5,
                          batch_size=1, crop_size=32, max_steps=5, warmup_steps=2, learning_rate=1e-3,
                          sample_posterior=True, eval_every_steps=2, checkpoint_every_steps=3, eval_num_clips=1,
                          eval_num_frames=5, stats_num_clips=2, num_threads=1)
    whole = recipe.main(["--config", config, "--output_dir", str(tmp_path / "whole")])

    original, calls = recipe.reconstruction_loss, []

    def killed_in_step_4(*args, **kwargs):
        calls.append(None)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(recipe, "reconstruction_loss", killed_in_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "killed")])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "killed" / "vae_checkpoints")) == ["checkpoint-3"]
    resumed = recipe.main(["--config", config, "--output_dir", str(tmp_path / "killed"), "--resume", "last"])

    assert resumed["resumed_from"]["step"] == 3 and resumed["steps"] == whole["steps"] == 5
    assert resumed["train_curve"] == whole["train_curve"] and len(whole["train_curve"]) == 1  # steps 1-5 averaged
    assert [(e["step"], e["psnr"]) for e in resumed["eval_curve"]] == [(e["step"], e["psnr"]) for e in
                                                                       whole["eval_curve"]]
    assert [e["step"] for e in whole["eval_curve"]] == [0, 2, 4, 5]
    assert resumed["latents_mean"] == whole["latents_mean"] and resumed["latents_std"] == whole["latents_std"]
    a, b = (AutoencoderKLWan.from_pretrained(tmp_path / run / "vae").state_dict() for run in ("killed", "whole"))
    assert all(torch.equal(a[k], v) for k, v in b.items())

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process.*WORLD_SIZE"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "two")])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="--resume"):
        recipe.main(["--config", config, "--output_dir", str(tmp_path / "none"), "--resume", "last"])


def test_recipe_schedule_position_follows_steps_then_the_time_budget():
    """The learning-rate clock of the VAE and teacher loops: the step count through the warm-up, then the step count
    or the time budget's share of the decay, whichever is further (never past ``max_steps``)."""
    from diffusers_raven.utils.recipes import schedule_position

    # warm-up 10 of 110 steps: half the budget spent is position 10 + 50 = 60
    assert schedule_position(5, 50.0, 100.0, 10, 110) == 5  # in the warm-up the steps decide
    assert schedule_position(10, 50.0, 100.0, 10, 110) == 60
    assert schedule_position(70, 50.0, 100.0, 10, 110) == 70
    assert schedule_position(12, 25.5, 100.0, 10, 110) == 35  # 10 + floor(25.5)
    assert schedule_position(20, 500.0, 100.0, 10, 110) == 110
    assert schedule_position(3, 99.0, 100.0, 0, 4) == 3  # floor(0.99 * 4) = 3


@pytest.mark.parametrize("decoder_base_dim", [None, 12])
def test_shapes_vae_decoder_fine_tuning_keeps_the_latent_space(tmp_path, decoder_base_dim):
    """``train_encoder: false`` trains only the decoder of ``init_from``: the encoder, quant_conv and latent
    statistics stay bit-identical (so later stages' latents stay valid); a wider ``decoder_base_dim`` gets a new
    decoder of that width under the same encoder."""
    import torch
    from diffusers import AutoencoderKLWan

    from diffusers_raven.utils.tiny import tiny_vae

    torch.manual_seed(0)
    source = tiny_vae(z_dim=4, base_dim=8)
    source.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 0.6, 0.7, 0.8])
    source.save_pretrained(tmp_path / "init")
    config = write_config(
        tmp_path / "decoder.yaml",
        init_from=str(tmp_path / "init"),
        train_encoder=False,
        decoder_base_dim=decoder_base_dim,
        num_frames=5,
        batch_size=1,
        crop_size=32,
        max_steps=2,
        warmup_steps=1,
        learning_rate=1e-2,
        eval_num_clips=1,
        eval_num_frames=5,
        stats_num_clips=1,
    )
    results = load_recipe("shapes_vae").main(["--config", config, "--output_dir", str(tmp_path / "out")])
    tuned = AutoencoderKLWan.from_pretrained(tmp_path / "out" / "vae")
    before, after = source.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert list(tuned.config.latents_mean) == [0.1, -0.2, 0.3, 0.0]
    assert list(tuned.config.latents_std) == [0.5, 0.6, 0.7, 0.8]
    decoder = [k for k in after if k.startswith("decoder.")]
    if decoder_base_dim is None:  # the loaded decoder went on training
        assert any(not torch.equal(before[k], after[k]) for k in decoder)
    else:
        assert tuned.config.decoder_base_dim == 12
        assert any(before.get(k) is None or before[k].shape != after[k].shape for k in decoder)
    assert results["num_trained_parameters"] == sum(after[k].numel() for k in after if not k.startswith(
        ("encoder.", "quant_conv.")))
    with pytest.raises(ValueError, match="train_encoder=False needs init_from"):
        load_recipe("shapes_vae").ShapesVAEConfig(train_encoder=False)
    with pytest.raises(ValueError, match="init_from"):
        load_recipe("shapes_vae").ShapesVAEConfig(init_from=str(tmp_path / "missing"))


def test_shapes_bundle_ships_a_loadable_half_size_pipeline(tmp_path):
    """The bundling step stores the transformer in float16, records the training size as the default, and the
    bundled folder loads as float32 and reproduces the source pipeline's video up to the float16 weight rounding."""
    import torch

    from diffusers_raven import CausalVideoPipeline
    from diffusers_raven.pipelines.presets import random_tiny_pipeline

    torch.set_num_threads(1)
    random_tiny_pipeline().save_pretrained(tmp_path / "src")
    result = load_recipe("shapes_bundle").main(
        ["--pipeline", str(tmp_path / "src"), "--output", str(tmp_path / "bundled"), "--height", "32", "--width", "32"]
    )
    pipe = CausalVideoPipeline.from_pretrained(tmp_path / "bundled")
    assert (pipe.default_height, pipe.default_width) == (32, 32)
    assert next(pipe.transformer.parameters()).dtype == torch.float32
    stored = json.loads((tmp_path / "bundled" / "transformer" / "config.json").read_text())
    assert stored.get("_diffusers_version") and (tmp_path / "bundled" / "README.md").exists()
    src_bytes = sum(f.stat().st_size for f in (tmp_path / "src" / "transformer").iterdir())
    new_bytes = sum(f.stat().st_size for f in (tmp_path / "bundled" / "transformer").iterdir())
    assert new_bytes < 0.6 * src_bytes
    assert 0 < result["max_abs_frame_diff_vs_source"] < 1e-2
    with pytest.raises(SystemExit, match="--pipeline"):
        load_recipe("shapes_bundle").main(["--pipeline", str(tmp_path / "missing")])


def test_shapes_bundle_ships_a_fine_tuned_decoder_only_with_the_same_encoder(tmp_path):
    import torch

    from diffusers_raven import CausalVideoPipeline
    from diffusers_raven.pipelines.presets import random_tiny_pipeline

    torch.set_num_threads(1)
    pipe = random_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "src")
    vae = pipe.vae
    with torch.no_grad():  # a "fine-tuned" decoder: same encoder, other decoder weights
        vae.decoder.conv_out.weight.mul_(0.5)
    vae.save_pretrained(tmp_path / "decoder")
    load_recipe("shapes_bundle").main(["--pipeline", str(tmp_path / "src"), "--output", str(tmp_path / "bundled"),
                                       "--vae", str(tmp_path / "decoder"), "--height", "32", "--width", "32"])
    shipped = CausalVideoPipeline.from_pretrained(tmp_path / "bundled").vae
    assert torch.equal(shipped.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    with torch.no_grad():  # another encoder: another latent space, refused
        vae.encoder.conv_in.weight.add_(1.0)
    vae.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="--vae .*encoder differs"):
        load_recipe("shapes_bundle").main(["--pipeline", str(tmp_path / "src"), "--output", str(tmp_path / "b2"),
                                           "--vae", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--vae"):
        load_recipe("shapes_bundle").main(["--pipeline", str(tmp_path / "src"), "--vae", str(tmp_path / "none")])


def save_tiny_pipeline_and_teacher(tmp_path):
    """The random tiny pipeline in ``tmp_path/tiny`` and its transformer, as a teacher of matching sizes, in
    ``tmp_path/teacher`` (one thread, as the chain evaluation's tests assume)."""
    import torch

    from diffusers_raven.pipelines.presets import random_tiny_pipeline

    torch.set_num_threads(1)
    pipe = random_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    pipe.transformer.save_pretrained(tmp_path / "teacher")
    return pipe


def test_shapes_eval_chain_scores_every_stage_on_the_same_captions(tmp_path):
    """The chain evaluation scores ground truth perfectly and gives the random tiny pipeline, passed as a pipeline
    folder, exactly the figures of its own ``random_tiny`` chance row (same captions, seed and sampler)."""
    import torch

    from diffusers_raven.pipelines.presets import random_tiny_pipeline

    torch.set_num_threads(1)
    pipe = random_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    pipe.transformer.save_pretrained(tmp_path / "teacher")  # a Wan transformer of matching sizes
    out = tmp_path / "chain.json"
    report = load_recipe("shapes_eval_chain").main([
        "--pipeline", f"tiny={tmp_path / 'tiny'}", "--teacher", str(tmp_path / "teacher"), "--videos", "2",
        "--height", "32", "--width", "32", "--teacher_steps", "4", "--long_factor", "2", "--output", str(out)])
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"ground_truth", "vae_round_trip", "random_tiny", "teacher", "tiny"}
    assert models["ground_truth"]["semantic_accuracy"] == 1.0
    for key in ("semantic_accuracy", "psnr", "count_accuracy"):
        assert models["tiny"][key] == models["random_tiny"][key]
    assert len(models["tiny"]["long"]["per_chunk"]) == 4 and report["evaluator"]
    per_video = models["tiny"]["semantic_accuracy_per_video"]
    assert len(per_video) == 2 and sum(per_video) / 2 == pytest.approx(models["tiny"]["semantic_accuracy"])
    sensitivity = models["teacher"]["caption_sensitivity"]
    assert sensitivity["num_samples"] == 2 and sensitivity["sigmas"] == [0.9, 0.7, 0.5, 0.3]
    assert set(sensitivity["gap"]) == {"background", "color", "shape", "direction", "speed", "empty"}
    assert all(len(v) == 4 for v in sensitivity["gap"].values()) and "caption_sensitivity" not in models["tiny"]
    assert set(sensitivity["edit_latent_msd"]) == set(sensitivity["gap"]) - {"empty"}
    assert all(v > 0 for v in sensitivity["edit_latent_msd"].values())  # every edit changes the video
    with pytest.raises(SystemExit, match="--pipeline"):
        load_recipe("shapes_eval_chain").main(["--pipeline", "nofolder", "--output", str(out)])


def test_shapes_eval_chain_scores_a_teacher_at_several_guidance_scales(tmp_path):
    """Several ``--guidance_scale`` values give one teacher entry per scale, each equal to a run at that scale alone
    (same captions, noise and sampler), and the same caption sensitivity; ``--teacher_steps 0`` records only that
    sensitivity; ``--long_factor 0`` skips the long videos only; bad values are refused, naming the option."""
    save_tiny_pipeline_and_teacher(tmp_path)
    common = ["--pipeline", f"tiny={tmp_path / 'tiny'}", "--teacher", f"t={tmp_path / 'teacher'}", "--videos", "2",
              "--height", "32", "--width", "32", "--teacher_steps", "3", "--long_factor", "1"]
    recipe = load_recipe("shapes_eval_chain")
    both = recipe.main([*common, "--guidance_scale", "1", "4", "--output", str(tmp_path / "both.json")])["models"]
    alone = recipe.main([*common, "--guidance_scale", "4", "--long_factor", "0",
                         "--output", str(tmp_path / "alone.json")])["models"]
    assert {"t@cfg1", "t@cfg4"} <= set(both) and "t" not in both
    assert "long" in both["tiny"] and "long" not in alone["tiny"]  # --long_factor 0: no long videos
    assert alone["tiny"]["semantic_accuracy"] == both["tiny"]["semantic_accuracy"]
    assert both["t@cfg4"]["guidance_scale"] == 4.0 and both["t@cfg1"]["guidance_scale"] == 1.0
    for key in ("semantic_accuracy", "psnr", "semantic_accuracy_per_video", "caption_sensitivity"):
        assert both["t@cfg4"][key] == alone["t"][key]
    assert both["t@cfg1"]["caption_sensitivity"] == alone["t"]["caption_sensitivity"]  # it does not depend on CFG
    only = recipe.main([*common, "--guidance_scale", "1", "4", "--teacher_steps", "0", "--long_factor", "0",
                        "--output", str(tmp_path / "only.json")])["models"]  # no teacher video: the sensitivity only
    assert only["t"] == {"caption_sensitivity": alone["t"]["caption_sensitivity"]} and "t@cfg4" not in only
    with pytest.raises(SystemExit, match="--teacher_steps"):
        recipe.main([*common, "--teacher_steps", "0", "--sensitivity_videos", "0", "--output", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="--guidance_scale"):
        recipe.main([*common, "--guidance_scale", "0.5", "--output", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="--long_factor"):
        recipe.main([*common, "--long_factor", "-1", "--output", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="--sensitivity_videos"):
        recipe.main([*common, "--sensitivity_videos", "3", "--output", str(tmp_path / "bad.json")])


def test_shapes_eval_chain_pairs_models_against_a_reference(tmp_path):
    """``--compare`` pairs every model's per-video semantic accuracy with a reference's: a model of the same run, or
    one read from an earlier output (checked to be on the same captions and evaluator). The means and standard
    errors equal a hand computation from the per-video lists; a model re-scored against its own earlier figures
    differs by exactly 0; bad references are refused, naming the option."""
    import statistics

    save_tiny_pipeline_and_teacher(tmp_path)
    common = ["--pipeline", f"tiny={tmp_path / 'tiny'}", "--teacher", f"t={tmp_path / 'teacher'}", "--videos", "3",
              "--height", "32", "--width", "32", "--teacher_steps", "2", "--sensitivity_videos", "0"]
    recipe = load_recipe("shapes_eval_chain")
    first = recipe.main([*common, "--long_factor", "2", "--compare", "t", "--output", str(tmp_path / "a.json")])
    models, paired = first["models"], first["paired"]["t"]
    assert set(paired) == {"vae_round_trip", "random_tiny", "tiny"}  # neither the reference nor the ground truth
    for name, row in paired.items():
        d = [a - b for a, b in zip(models[name]["semantic_accuracy_per_video"], models["t"]["semantic_accuracy_per_video"])]
        assert row["mean"] == pytest.approx(sum(d) / 3, abs=1e-12) and row["num_videos"] == 3
        assert row["stderr"] == pytest.approx(statistics.stdev(d) / 3 ** 0.5, abs=1e-12)
    assert paired["tiny"]["mean"] == paired["random_tiny"]["mean"]  # the same pipeline, the same videos
    again = recipe.main([*common, "--long_factor", "2", "--compare", "tiny", "--compare", f"{tmp_path / 'a.json'}:t",
                         "--compare", f"{tmp_path / 'a.json'}:tiny", "--output", str(tmp_path / "b.json")])["paired"]
    assert again["a.json:t"]["t"] == {"mean": 0.0, "stderr": 0.0, "num_videos": 3}  # re-scored: the same videos
    assert again["a.json:tiny"]["tiny"]["long"]["mean"] == 0.0  # the long videos are paired too
    assert again["a.json:t"]["tiny"]["mean"] == pytest.approx(paired["tiny"]["mean"], abs=1e-12)
    assert again["tiny"]["t"]["mean"] == pytest.approx(-paired["tiny"]["mean"], abs=1e-12)
    stale = json.loads((tmp_path / "a.json").read_text())
    stale["evaluator"] = "0" * 12
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    for bad, match in ((["--compare", "nosuch"], "--compare nosuch: no model"),
                       (["--compare", f"{tmp_path / 'none.json'}:t"], "--compare .*no file"),
                       (["--compare", f"{tmp_path / 'a.json'}:nosuch"], "--compare .*no scored model"),
                       (["--compare", f"{tmp_path / 'a.json'}:t", "--eval_seed", "7"], "--compare .*other captions"),
                       (["--compare", f"{tmp_path / 'stale.json'}:t"], "--compare .*another evaluator")):
        with pytest.raises(SystemExit, match=match):
            recipe.main([*common, "--long_factor", "0", *bad, "--output", str(tmp_path / "bad.json")])


def test_shapes_eval_chain_decodes_teachers_with_the_vae_option(tmp_path):
    """``--vae`` is the teachers' latent space: a teacher trained on another VAE (here 16 latent channels where the
    pipeline's VAE has 4) is sampled in that VAE's latents and decoded by it; ``--vae`` naming a saved copy of the
    pipeline's own VAE changes no figure."""
    import torch

    from diffusers_raven.pipelines.presets import random_tiny_pipeline
    from diffusers_raven.utils.tiny import tiny_transformer, tiny_vae

    torch.set_num_threads(1)
    pipe = random_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    pipe.vae.save_pretrained(tmp_path / "same_vae")
    pipe.transformer.save_pretrained(tmp_path / "teacher")
    tiny_vae(z_dim=16, base_dim=8, seed=1).save_pretrained(tmp_path / "vae16")
    tiny_transformer(in_channels=16, text_dim=pipe.text_encoder.config.d_model).save_pretrained(tmp_path / "t16")
    common = ["--pipeline", f"tiny={tmp_path / 'tiny'}", "--videos", "2", "--height", "32", "--width", "32",
              "--teacher_steps", "2", "--long_factor", "0"]
    recipe = load_recipe("shapes_eval_chain")
    plain = recipe.main([*common, "--teacher", str(tmp_path / "teacher"), "--output", str(tmp_path / "a.json")])
    same = recipe.main([*common, "--teacher", str(tmp_path / "teacher"), "--vae", str(tmp_path / "same_vae"),
                        "--output", str(tmp_path / "b.json")])
    for name in ("vae_round_trip", "teacher"):
        assert same["models"][name]["semantic_accuracy_per_video"] == plain["models"][name]["semantic_accuracy_per_video"]
        assert same["models"][name]["psnr"] == plain["models"][name]["psnr"]
    other = recipe.main([*common, "--teacher", str(tmp_path / "t16"), "--vae", str(tmp_path / "vae16"),
                         "--output", str(tmp_path / "c.json")])["models"]
    assert other["teacher"]["psnr"] != plain["models"]["teacher"]["psnr"]
    assert other["vae_round_trip"]["psnr"] != plain["models"]["vae_round_trip"]["psnr"]
    with pytest.raises(ValueError, match="16 channels"):  # without --vae: the pipeline VAE has 4 latent channels
        recipe.main([*common, "--teacher", str(tmp_path / "t16"), "--output", str(tmp_path / "d.json")])
