"""diffusers-raven streaming text-to-video demo (a Gradio 6 Space).

The video is streamed chunk by chunk while it is generated: every chunk the pipeline decodes is written to its own
short ``.mp4`` segment and yielded to a ``gr.Video(streaming=True)`` output, which Gradio turns into an HLS stream
that the browser plays as the segments arrive. A second prompt can take over from a chosen frame
(``CausalVideoStream.switch_prompt``), and the "endless" length streams until Stop is pressed. An uploaded clip (a
video or an image) is continued: it is encoded into the model's cache, played back first, and the stream goes on
from its last frame.

Run locally with ``python spaces/raven-demo/app.py`` (``PORT`` / ``GRADIO_SERVER_PORT`` and ``GRADIO_SERVER_NAME``
are honoured; the default is http://127.0.0.1:7860).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from diffusers_raven import CausalVideoPipeline
from diffusers_raven.pipelines.presets import DEFAULT_MODEL, bundled_model_available, load_pipeline
from diffusers_raven.utils.video import VideoWriter, read_video

logger = logging.getLogger("raven-demo")

#: Frames per second of the streamed video (the default of the CLI's ``--fps`` and of ``VideoWriter``).
FPS = 16
#: Lengths offered in the UI: 1 + 4·(3n − 1) output frames, whole chunks for 3-latent-frame chunks.
LENGTH_CHOICES = ("9", "21", "33", "45", "81")
ENDLESS = "endless"
#: Output sizes offered in the UI ("auto" is the pipeline's own default size).
SIZE_CHOICES = (("model default", "auto"), ("32×32", "32"), ("64×64", "64"), ("128×128", "128"), ("256×256", "256"))
#: Loaded pipelines kept in memory (least recently used ones are dropped first).
MAX_CACHED_MODELS = int(os.environ.get("RAVEN_MAX_CACHED_MODELS", "2"))
#: A generation stops by itself after this many seconds (an endless stream in a forgotten tab would hold the CPU).
MAX_SECONDS = float(os.environ.get("RAVEN_MAX_SECONDS", "300"))
#: How many generations run at the same time (they share the CPU; chunks of different users interleave).
CONCURRENCY = int(os.environ.get("RAVEN_CONCURRENCY", "2"))

CSS = """
#title {text-align: center}
#fps textarea, #status textarea {font-family: var(--font-mono)}
"""


class UserError(ValueError):
    """A problem with the request, shown to the user as a one-line message."""


@dataclass
class LoadedModel:
    """A pipeline shared by every request for the same ``model`` string."""

    pipe: CausalVideoPipeline
    description: str
    # The scheduler of a pipeline keeps per-call state, so chunks of different streams on one pipeline are
    # computed one at a time (each stream keeps its own KV cache, VAE cache and generator between chunks).
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: OrderedDict[str, LoadedModel] = OrderedDict()
_MODELS_LOCK = threading.Lock()


def one_line(text: object) -> str:
    """``text`` on one line (messages shown in the UI never carry a traceback)."""
    return " ".join(str(text).split())


def get_model(model: str | None) -> LoadedModel:
    """The pipeline named ``model`` (``"bundled"``, ``"random-tiny"``, a folder or a Hub id), loaded once and cached."""
    key = (model or "").strip() or DEFAULT_MODEL
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        # Loading under the lock: two users asking for the same new model load it once; the cache is small anyway.
        pipe, description = load_pipeline(key)  # FileNotFoundError / ValueError with a clear message for bad names
        pipe.set_progress_bar_config(disable=True)
        loaded = LoadedModel(pipe=pipe, description=description)
        _MODELS[key] = loaded
        while len(_MODELS) > max(1, MAX_CACHED_MODELS):
            _MODELS.popitem(last=False)
        return loaded


def valid_lengths(pipe: CausalVideoPipeline, count: int = 5) -> list[int]:
    """The first ``count`` output lengths the pipeline can make: 1 + t·(c·n − 1) for chunk c and VAE factor t."""
    t, c = pipe.vae_scale_factor_temporal, pipe.chunk_frames
    return [1 + t * (c * n - 1) for n in range(1, count + 1)]


def parse_length(length: object, pipe: CausalVideoPipeline) -> int | None:
    """Output frames asked for (``None`` for an endless stream); ``UserError`` for an impossible count."""
    text = one_line(length if length is not None else "").lower()
    if text.startswith(ENDLESS):
        return None
    examples = ", ".join(str(n) for n in valid_lengths(pipe))
    rule = f"1 + {pipe.vae_scale_factor_temporal}·({pipe.chunk_frames}·n − 1) frames, e.g. {examples}"
    try:
        frames = int(float(text))
    except ValueError:
        raise UserError(f"Length {text!r} is not a number of frames: use {rule}.") from None
    t, c = pipe.vae_scale_factor_temporal, pipe.chunk_frames
    if frames < 1 or (frames - 1) % t or ((frames - 1) // t + 1) % c:
        raise UserError(f"Length {frames} is not possible with this model: use {rule}.")
    return frames


def parse_size(size: object, pipe: CausalVideoPipeline) -> tuple[int, int]:
    """(height, width) in pixels; "auto" is the pipeline's default size."""
    text = one_line(size if size is not None else "auto").lower()
    if text in ("", "auto"):
        return pipe.default_height, pipe.default_width
    factor = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    try:
        pixels = int(text.split("×")[0].split("x")[0])
    except ValueError:
        raise UserError(f"Size {text!r} is not a number of pixels.") from None
    if pixels <= 0 or pixels % factor:
        raise UserError(f"Size {pixels} is not possible with this model: use a multiple of {factor} pixels.")
    return pixels, pixels


def parse_seed(seed: object) -> int:
    try:
        value = int(float(seed)) if seed not in (None, "") else 0
    except (TypeError, ValueError):
        raise UserError(f"Seed {seed!r} is not a whole number.") from None
    if not 0 <= value < 2**63:
        raise UserError(f"Seed {value} must be between 0 and 2**63 − 1.")
    return value


def read_clip(path: object) -> object:
    """The uploaded clip to continue as ``[F, H, W, 3]`` uint8 frames (a still image is a one-frame clip)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    name = Path(str(path)).name
    try:
        return read_video(str(path))
    except (ValueError, ImportError, FileNotFoundError) as err:
        video_error = err
    try:
        with Image.open(str(path)) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError):
        raise UserError(f"The clip {name!r} cannot be read as a video or an image ({video_error}).") from None


class PipelineNotes(logging.Handler):
    """Collects the pipeline's warnings (a clip resized or cut) raised in this thread, to show them to the user."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(one_line(record.getMessage()))


def speed_text(frames: int, seconds: float) -> str:
    if frames <= 0 or seconds <= 0:
        return "—"
    return f"{frames / seconds:.2f} frames/s ({frames} frames in {seconds:.1f} s)"


def generate(
    prompt: str,
    length: str,
    seed: float,
    second_prompt: str,
    switch_at: float,
    model: str,
    size: str,
    clip: str | None = None,
) -> Iterator[tuple]:
    """Stream a video: yields (segment .mp4 or skip, generation speed, status) once per chunk.

    With an uploaded ``clip`` the stream continues it: its chunks come first (encoded and decoded by the model's VAE),
    then as many generated chunks as ``length`` has (an endless stream goes on until Stop).

    Every failure becomes a one-line ``gr.Error`` (the traceback of unexpected ones goes to the server log only), so
    a bad request never takes the app down for other users.
    """
    workdir = None
    stream = None
    try:
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("Please enter a prompt.")
        second_prompt = (second_prompt or "").strip()
        seed_value = parse_seed(seed)
        if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
            raise UserError("Streaming video needs ffmpeg and ffprobe on the PATH (e.g. apt-get install ffmpeg).")

        yield gr.skip(), "—", f"Loading model {(model or DEFAULT_MODEL).strip() or DEFAULT_MODEL} …"
        loaded = get_model(model)
        pipe = loaded.pipe
        num_frames = parse_length(length, pipe)
        height, width = parse_size(size, pipe)
        endless = num_frames is None
        window = {}
        if endless:  # a bounded attention window keeps memory flat (docs/streaming.md): 4 chunks, the first as sinks
            window = {"window_frames": 4 * pipe.chunk_frames, "sink_frames": pipe.chunk_frames}
        frames_in = None
        if clip:
            frames_in = read_clip(clip)
            kept, clip_latent = pipe.clip_frames_kept(len(frames_in), window.get("window_frames"))
            if num_frames is not None:  # the length's chunks, after the clip: the whole video is longer
                chunks = pipe.latent_frames_for(num_frames) // pipe.chunk_frames
                num_frames = 1 + pipe.vae_scale_factor_temporal * (clip_latent + chunks * pipe.chunk_frames - 1)
        switch_frame = None
        if second_prompt:
            try:
                switch_frame = int(float(switch_at))
            except (TypeError, ValueError):
                raise UserError(f"'Switch at frame' {switch_at!r} is not a whole number.") from None
            if switch_frame < 1:
                raise UserError("'Switch at frame' must be 1 or more (frame 0 always follows the first prompt).")
            if num_frames is not None and switch_frame >= num_frames:
                gr.Warning(
                    f"The video has {num_frames} frames, so the second prompt (from frame {switch_frame}) is not used."
                )
                switch_frame = None
        generator = torch.Generator(device="cpu").manual_seed(seed_value)
        workdir = Path(tempfile.mkdtemp(prefix="raven-space-"))
        what = f"an endless stream at {height}×{width}" if endless else f"{num_frames} frames at {height}×{width}"
        if frames_in is not None:
            what += f", continuing the last {kept} frames of the clip"

        start = time.perf_counter()
        notes = PipelineNotes()
        logging.getLogger("diffusers_raven").addHandler(notes)
        try:
            with loaded.lock:
                stream = pipe.stream(
                    prompt, height=height, width=width, num_frames=num_frames, generator=generator, video=frames_in,
                    **window,
                )
        finally:
            logging.getLogger("diffusers_raven").removeHandler(notes)
        for message in notes.messages:
            gr.Warning(message)
        done = 0
        switched = False
        yield gr.skip(), "—", f"Generating {what} with the {loaded.description} …"
        while True:
            with loaded.lock:
                chunk = next(stream, None)
            if chunk is None:
                break
            frames = chunk.frames[0]
            segment = workdir / f"chunk_{chunk.chunk_index:05d}.mp4"
            with VideoWriter(segment, fps=FPS) as writer:
                writer.append(frames)
            done = chunk.frame_start + frames.shape[0]
            elapsed = time.perf_counter() - start
            label = second_prompt if chunk.prompt_index else prompt
            status = f"Chunk {chunk.chunk_index + 1}: frames {chunk.frame_start}–{done - 1}"
            status += f" of {num_frames}" if num_frames else " (endless, press Stop)"
            status += " · the clip (encoded and decoded)" if chunk.is_prefix else f" · prompt: {label!r}"
            if switch_frame is not None and not switched and done >= switch_frame:
                with loaded.lock:
                    stream.switch_prompt(second_prompt)
                switched = True
                status += f" · switching to {second_prompt!r} from frame {done}"
            yield str(segment), speed_text(done, elapsed), status
            if elapsed > MAX_SECONDS:
                gr.Warning(f"Stopped after {MAX_SECONDS:.0f} s, the time limit of one generation on this server.")
                break
        elapsed = time.perf_counter() - start
        yield (
            gr.skip(),
            speed_text(done, elapsed),
            f"Done: {done} frames at {height}×{width} in {elapsed:.1f} s with the {loaded.description}.",
        )
    except (UserError, FileNotFoundError, ValueError) as err:
        raise gr.Error(one_line(err), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as err:  # anything else: log it for the operator, show one line to the user
        logger.exception("generation failed")
        raise gr.Error(one_line(f"Generation failed: {type(err).__name__}: {err}"), print_exception=False) from None
    finally:
        if stream is not None:
            stream.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _intro() -> str:
    if bundled_model_available():
        model = "The default model is the bundled ShapesWorld model (coloured shapes moving on a plain background)."
    else:
        model = (
            "**No bundled ShapesWorld model is installed, so the default is a randomly initialised tiny pipeline:** "
            "its video is noise-like and only shows the machinery (streaming, prompt switches). "
            "Put a saved pipeline folder or a Hub repository id in *Model* to use trained weights."
        )
    return (
        "# diffusers-raven: streaming text-to-video\n"
        "A causal video transformer with a KV cache generates the video chunk by chunk; every chunk is streamed to "
        f"the player as soon as it is decoded. {model}"
    )


def build_demo(
    default_length: str = "21", default_size: str = "auto", default_model: str = DEFAULT_MODEL
) -> gr.Blocks:
    """The Gradio app (not launched). The defaults set the initial values of the length, size and model boxes."""
    with gr.Blocks(title="diffusers-raven streaming video", analytics_enabled=False) as demo:
        gr.Markdown(_intro(), elem_id="title")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt",
                    value="",
                    placeholder="a red circle moving right on a black background",
                    lines=2,
                    elem_id="prompt",
                )
                with gr.Row():
                    length = gr.Dropdown(
                        choices=[*LENGTH_CHOICES, (f"{ENDLESS} (until Stop)", ENDLESS)],
                        value=default_length,
                        label="Length (output frames)",
                        info="1 + 4·(3n − 1) frames for 3-frame chunks; with a clip, its chunks are added to the clip",
                        allow_custom_value=True,
                        elem_id="length",
                    )
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                with gr.Row():
                    second_prompt = gr.Textbox(
                        label="Second prompt (optional)", placeholder="a blue square moving left", elem_id="prompt2"
                    )
                    switch_at = gr.Number(label="Switch at frame", value=21, precision=0, minimum=1, elem_id="switch")
                clip = gr.File(
                    label="Clip to continue (optional: a video or an image)",
                    file_types=[".mp4", ".gif", ".webm", ".mov", ".png", ".jpg", ".jpeg"],
                    type="filepath",
                    height=140,
                    elem_id="clip",
                )
                with gr.Accordion("Model and size", open=False):
                    model = gr.Textbox(
                        label="Model",
                        value=default_model,
                        info="'bundled', 'random-tiny', a local pipeline folder or a Hub repository id",
                        elem_id="model",
                    )
                    size = gr.Dropdown(
                        choices=list(SIZE_CHOICES), value=default_size, label="Size (pixels)", elem_id="size"
                    )
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                video = gr.Video(
                    label="Video (streamed chunk by chunk)", streaming=True, autoplay=True, height=400, elem_id="video"
                )
                fps = gr.Textbox(label="Generation speed", value="—", interactive=False, elem_id="fps")
                status = gr.Textbox(label="Status", value="Ready.", interactive=False, elem_id="status")
        event = gr.on(
            triggers=[run.click, prompt.submit],
            fn=generate,
            inputs=[prompt, length, seed, second_prompt, switch_at, model, size, clip],
            outputs=[video, fps, status],
            api_name="generate",
            concurrency_limit=CONCURRENCY,
        )
        stop.click(lambda: "Stopped.", outputs=[status], cancels=[event], api_name=False)
    demo.queue()
    return demo


def launch_kwargs() -> dict:
    """Arguments of ``launch()`` shared by :func:`main` and the tests (Gradio 6 takes theme and css here)."""
    return {"theme": gr.themes.Default(), "css": CSS, "ssr_mode": False, "share": False}


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    server_name = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    build_demo().launch(server_name=server_name, server_port=port, **launch_kwargs())


if __name__ == "__main__":
    main()
