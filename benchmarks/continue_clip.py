"""Continuing a clip with the bundled model: how far a continuation from pixels is from the uninterrupted stream.

For every prompt, the bundled ShapesWorld model makes a 45-frame video (4 chunks of 3 latent frames, 64×64) from fixed
noise. Its first 21 frames (2 chunks) are then continued with ``pipe(video=...)``, with the same noise for the later
chunks and the generator in the state the uninterrupted stream had when chunk 3 started:

- from the clip's **latents** (``video_latents=``): the later chunks must be the uninterrupted ones, bit for bit;
- from its decoded **pixels** (float frames in [0, 1]): the clip goes through the VAE again (encode, then decode), so
  the history the later chunks attend to is the VAE round trip of the original one;
- from an **.mp4 file** of the clip (``save_video`` → ``read_video``: uint8, H.264, enlarged to 128×128 by the writer
  and resized back), what the CLI's ``--continue`` sees.

The difference to the uninterrupted video is reported per part (the clip, chunk 3, chunk 4) as the mean absolute
pixel difference (frames in [0, 1]) and the PSNR, next to a *different continuation*: the same clip continued (from its
latents) with other noise, the scale of "another video". The figure (``docs/images/continue_seam.png``) shows the
frames around the seam of one prompt, uninterrupted and continued from the .mp4 file.

    python benchmarks/continue_clip.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO_ROOT, argument_parser, header, print_table, result_name, setup, write_results

from diffusers_raven.pipelines.presets import load_pipeline
from diffusers_raven.utils.video import read_video, save_video

PROMPTS = [
    "a red circle moving right on a black background",
    "a blue square moving left on a white background",
    "a green triangle moving up on a black background",
    "a yellow circle moving down on a gray background",
    "two red squares moving right on a white background",
    "a white circle moving left on a blue background",
]
SEED = 0
NUM_FRAMES = 45  # 12 latent frames: 4 chunks
CLIP_CHUNKS = 2  # the clip: 6 latent frames, 21 frames
FIGURE = REPO_ROOT / "docs" / "images" / "continue_seam.png"
FIGURE_FRAMES = range(15, 27)  # 6 frames of the clip, 6 after the seam
FIGURE_PROMPT = 3  # a prompt whose shape stays in view across the seam (the bundled model loses some shapes)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of frames in [0, 1]; ``None`` for identical frames (infinite)."""
    mse = float(np.mean((a - b) ** 2))
    return None if mse == 0 else float(10 * np.log10(1 / mse))


def parts(video: np.ndarray, reference: np.ndarray, clip_frames: int) -> dict[str, dict[str, float]]:
    """Mean absolute difference and PSNR of the clip, chunk 3 and chunk 4 (frames in [0, 1])."""
    spans = {"clip": (0, clip_frames), "chunk 3": (clip_frames, clip_frames + 12), "chunk 4": (clip_frames + 12, None)}
    out = {}
    for name, (a, b) in spans.items():
        x, y = video[a:b], reference[a:b]
        out[name] = {"mean_abs": float(np.abs(x - y).mean()), "psnr_db": psnr(x, y)}
    return out


def continue_clip(pipe, prompt, noise, state, output_type="np", **clip):
    """The whole video (clip included) continued from the stream's generator state with the given noise."""
    g = torch.Generator()
    g.set_state(state)
    return pipe(prompt, num_frames=NUM_FRAMES, latents=noise, generator=g, output_type=output_type, **clip).frames[0]


def figure(rows: dict[str, np.ndarray], clip_frames: int, path: Path, prompt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(FIGURE_FRAMES)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.05 * len(columns), 1.25 * len(rows) + 0.45))
    for r, (label, video) in enumerate(rows.items()):
        for c, frame in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(video[frame], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if frame >= clip_frames:
                for side in ax.spines.values():
                    side.set_edgecolor("tab:orange")
                    side.set_linewidth(2)
            if r == 0:
                ax.set_title(f"{frame}" + (" (seam)" if frame == clip_frames else ""), fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(
        f"“{prompt}”: frames {columns[0]}–{columns[-1]}; the clip ends at frame {clip_frames - 1}, "
        "generated frames framed in orange",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path.relative_to(REPO_ROOT)}")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-figure", action="store_true", help="do not write the figure")
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("Continuing a clip: the uninterrupted stream against continuations from latents, pixels and .mp4")

    pipe, description = load_pipeline("bundled")
    pipe.set_progress_bar_config(disable=True)
    channels = pipe.transformer.config.in_channels
    h, w = pipe.default_height // pipe.vae_scale_factor_spatial, pipe.default_width // pipe.vae_scale_factor_spatial
    latent_frames = pipe.latent_frames_for(NUM_FRAMES)
    clip_latent = CLIP_CHUNKS * pipe.chunk_frames
    clip_frames = 1 + pipe.vae_scale_factor_temporal * (clip_latent - 1)

    results, rows = [], []
    workdir = Path(tempfile.mkdtemp(prefix="continue-clip-"))
    for i, prompt in enumerate(PROMPTS):
        noise = torch.randn(1, channels, latent_frames, h, w, generator=generator(100 + i))
        other = torch.randn(1, channels, latent_frames, h, w, generator=generator(200 + i))
        # The uninterrupted stream; the generator's state when chunk CLIP_CHUNKS + 1 starts.
        g = generator(SEED + i)
        chunks, state = [], None
        for chunk in pipe.stream(prompt, num_frames=NUM_FRAMES, latents=noise, generator=g, output_type="np"):
            chunks.append(chunk)
            if len(chunks) == CLIP_CHUNKS:
                state = g.get_state()
        video = np.concatenate([c.frames[0] for c in chunks])
        latents = torch.cat([c.latents for c in chunks], dim=2)
        clip_latents = latents[:, :, :clip_latent]

        from_latents = continue_clip(pipe, prompt, noise, state, video_latents=clip_latents, output_type="latent")
        exact = float((torch.as_tensor(from_latents) - latents[0]).abs().max())
        pixels = continue_clip(pipe, prompt, noise, state, video=video[:clip_frames])
        mp4 = save_video(video[:clip_frames], workdir / f"clip{i}.mp4")
        from_mp4 = continue_clip(pipe, prompt, noise, state, video=read_video(mp4))
        different = continue_clip(pipe, prompt, other, state, video_latents=clip_latents)
        with torch.no_grad():  # the clip's latents after the VAE round trip (as the pixel continuation wrote them)
            round_trip = pipe(prompt, num_frames=clip_frames + 12, video=video[:clip_frames], generator=generator(0),
                              output_type="latent", return_trajectory=True).trajectory
        re_encoded = torch.cat([r.clean for r in round_trip[:CLIP_CHUNKS]], dim=2)
        results.append({
            "prompt": prompt,
            "from_latents_max_abs_latent_difference": exact,
            "clip_latent_round_trip": {
                "mean_abs": float((re_encoded - clip_latents).abs().mean()),
                "max_abs": float((re_encoded - clip_latents).abs().max()),
                "latent_std": float(clip_latents.std()),
            },
            "from_pixels": parts(pixels, video, clip_frames),
            "from_mp4": parts(from_mp4, video, clip_frames),
            "different_continuation": parts(different, video, clip_frames),
        })
        rows.append(results[-1])
        if i == FIGURE_PROMPT and not args.no_figure:
            figure({"uninterrupted": video, "continued\nfrom .mp4": from_mp4}, clip_frames, FIGURE, prompt)

    def mean(key: str, part: str, field: str) -> float | None:
        values = [r[key][part][field] for r in results if r[key][part][field] is not None]
        return float(np.mean(values)) if values else None

    summary = {
        "from_latents_max_abs_latent_difference": max(r["from_latents_max_abs_latent_difference"] for r in results),
        "clip_latent_round_trip_mean_abs": float(np.mean([r["clip_latent_round_trip"]["mean_abs"] for r in results])),
        "clip_latent_std": float(np.mean([r["clip_latent_round_trip"]["latent_std"] for r in results])),
    }
    table = []
    for key in ("from_pixels", "from_mp4", "different_continuation"):
        for part in ("clip", "chunk 3", "chunk 4"):
            summary[f"{key}/{part}/mean_abs"] = mean(key, part, "mean_abs")
            summary[f"{key}/{part}/psnr_db"] = mean(key, part, "psnr_db")
        table.append([key, *(summary[f"{key}/{p}/mean_abs"] for p in ("clip", "chunk 3", "chunk 4")),
                      *(summary[f"{key}/{p}/psnr_db"] for p in ("clip", "chunk 3", "chunk 4"))])
    print(f"model: {description}; {len(PROMPTS)} prompts, {NUM_FRAMES} frames, clip = first {clip_frames} frames")
    print(f"from latents: largest latent difference to the uninterrupted stream "
          f"{summary['from_latents_max_abs_latent_difference']:.3g}")
    print(f"clip latents after the VAE round trip: mean |Δ| {summary['clip_latent_round_trip_mean_abs']:.3f} "
          f"(latent std {summary['clip_latent_std']:.3f})")
    print_table(["continuation", "clip |Δ|", "chunk 3 |Δ|", "chunk 4 |Δ|", "clip PSNR", "chunk 3 PSNR",
                 "chunk 4 PSNR"], table)
    write_results(
        result_name("continue_clip", args.threads),
        {"model": description, "num_frames": NUM_FRAMES, "clip_frames": clip_frames, "summary": summary,
         "per_prompt": results},
        started,
    )


if __name__ == "__main__":
    main()
