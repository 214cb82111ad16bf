"""Write videos to ``.mp4`` (H.264 through imageio-ffmpeg) or ``.gif`` (Pillow), whole or chunk by chunk, and read
them back (:func:`read_video`: any format ffmpeg reads, ``.gif`` with Pillow).

Frames are ``[F, H, W, 3]`` arrays, float in [0, 1] or ``uint8`` (a single ``[H, W, 3]`` frame is accepted too).
Small videos are enlarged with nearest-neighbour pixels by an integer factor until the shorter side is at least
``min_size`` (128 by default), so a 32×32 ShapesWorld clip stays viewable; ``.mp4`` frames are then padded by one
edge pixel where needed, because H.264 with ``yuv420p`` needs even sizes.

``.mp4`` needs the ``video`` extra (``pip install "diffusers-raven[video]"``); ``.gif`` only needs Pillow.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MIN_SIZE",
    "VIDEO_EXTENSIONS",
    "VideoWriter",
    "check_video_path",
    "read_video",
    "save_video",
    "to_uint8_frames",
]

#: File extensions :class:`VideoWriter` can write.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".gif")
#: Default smallest side (pixels) of a written video; smaller videos are enlarged by an integer factor.
DEFAULT_MIN_SIZE = 128


def check_video_path(path: str | os.PathLike) -> str:
    """Return the lower-case extension of ``path``; ``ValueError`` if it is not one of :data:`VIDEO_EXTENSIONS`."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        shown = suffix or "no extension"
        raise ValueError(
            f"cannot write video {str(path)!r} ({shown}): the file name must end in " + " or ".join(VIDEO_EXTENSIONS)
        )
    return suffix


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Convert ``[F, H, W, 3]`` (or ``[H, W, 3]``) frames, float in [0, 1] or uint8, to a uint8 array."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu().float().numpy()
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] (or one [H, W, 3] frame), got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"frames must be float in [0, 1] or uint8, got dtype {array.dtype}")
    return np.ascontiguousarray((np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _scale_factor(height: int, width: int, min_size: int) -> int:
    """The integer factor that brings the shorter side to at least ``min_size`` (1 if already large enough)."""
    shorter = min(height, width)
    if min_size <= 0 or shorter >= min_size:
        return 1
    return math.ceil(min_size / shorter)


class VideoWriter:
    """Write a video incrementally: ``append`` chunks of frames, then ``close`` (or use it as a context manager).

    ``.mp4`` frames go to ffmpeg as soon as they are appended. ``.gif`` frames are kept (as small uint8 arrays) and
    the file is written on ``close``, because Pillow writes a GIF in one go (merging identical consecutive frames
    into one longer frame). The first chunk fixes the frame size.

    Args:
        path: output file, ending in ``.mp4`` or ``.gif`` (its folder is created if missing).
        fps: frames per second.
        min_size: enlarge (nearest neighbour, integer factor) until the shorter side is at least this; 0 disables.
        crf: H.264 constant rate factor for ``.mp4`` (lower is better quality; 18 is visually lossless).
    """

    def __init__(
        self, path: str | os.PathLike, fps: float = 16, min_size: int = DEFAULT_MIN_SIZE, crf: int = 18
    ) -> None:
        self.format = check_video_path(path)
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.path = Path(path)
        self.fps = fps
        self.min_size = int(min_size)
        self.crf = int(crf)
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (height, width) of the input frames
        self._scale = 1
        self._pad = (0, 0)
        self._ffmpeg = None
        self._gif_frames: list[np.ndarray] = []
        self._closed = False
        if self.format == ".mp4":
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    'writing .mp4 needs imageio-ffmpeg: pip install "diffusers-raven[video]" (or write a .gif)'
                ) from err

    # ------------------------------------------------------------------ internals
    def _open(self, height: int, width: int) -> None:
        self.size = (height, width)
        self._scale = _scale_factor(height, width, self.min_size)
        out_h, out_w = height * self._scale, width * self._scale
        if self.format == ".mp4":
            self._pad = (out_h % 2, out_w % 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == ".mp4":
            import imageio_ffmpeg

            self._ffmpeg = imageio_ffmpeg.write_frames(
                str(self.path),
                (out_w + self._pad[1], out_h + self._pad[0]),
                fps=self.fps,
                codec="libx264",
                pix_fmt_in="rgb24",
                pix_fmt_out="yuv420p",
                quality=None,
                macro_block_size=1,
                ffmpeg_log_level="error",
                output_params=["-crf", str(self.crf)],
            )
            self._ffmpeg.send(None)

    def _prepare(self, frames: np.ndarray) -> np.ndarray:
        if self._scale > 1:
            frames = frames.repeat(self._scale, axis=1).repeat(self._scale, axis=2)
        if any(self._pad):
            frames = np.pad(frames, ((0, 0), (0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        return np.ascontiguousarray(frames)

    # ------------------------------------------------------------------ public API
    def append(self, frames: Any) -> None:
        """Append ``[n, H, W, 3]`` frames (float in [0, 1] or uint8) or one ``[H, W, 3]`` frame."""
        if self._closed:
            raise ValueError(f"the video writer for {str(self.path)!r} is closed")
        frames = to_uint8_frames(frames)
        if frames.shape[0] == 0:
            return
        height, width = frames.shape[1:3]
        if self.size is None:
            self._open(height, width)
        elif (height, width) != self.size:
            raise ValueError(f"frame size changed from {self.size[0]}x{self.size[1]} to {height}x{width}")
        frames = self._prepare(frames)
        if self._ffmpeg is not None:
            for frame in frames:
                self._ffmpeg.send(frame)
        else:
            self._gif_frames.extend(frames)
        self.frames_written += frames.shape[0]

    def close(self) -> None:
        """Finish the file (nothing is written if no frame was appended)."""
        if self._closed:
            return
        self._closed = True
        if self._ffmpeg is not None:
            self._ffmpeg.close()
            self._ffmpeg = None
        elif self._gif_frames:
            from PIL import Image

            images = [Image.fromarray(frame) for frame in self._gif_frames]
            self._gif_frames = []
            duration = max(20, round(1000 / self.fps))  # ms per frame; browsers treat < 20 ms as 100 ms
            images[0].save(
                self.path, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False
            )

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_video(frames: Any, path: str | os.PathLike, fps: float = 16, min_size: int = DEFAULT_MIN_SIZE) -> Path:
    """Write ``[F, H, W, 3]`` frames (float in [0, 1] or uint8) to ``path`` (``.mp4`` or ``.gif``); returns the path."""
    array = to_uint8_frames(frames)
    if array.shape[0] == 0:
        raise ValueError("no frames to write")
    with VideoWriter(path, fps=fps, min_size=min_size) as writer:
        writer.append(array)
    return writer.path


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Read a video file as ``[F, H, W, 3]`` uint8 RGB frames: ``.gif`` with Pillow, anything else with ffmpeg
    (imageio-ffmpeg, the ``video`` extra). ``max_frames`` keeps only the last frames (a long clip is streamed through,
    never held whole). ``FileNotFoundError`` for a missing file, ``ValueError`` for one that cannot be read as a video.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video file: {str(path)!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be positive, got {max_frames!r}")
    frames: collections.deque = collections.deque(maxlen=max_frames)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                for frame in ImageSequence.Iterator(image):
                    frames.append(np.asarray(frame.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read video {str(path)!r}: {err}") from err
    else:
        try:
            import imageio_ffmpeg
        except ImportError as err:
            raise ImportError(
                'reading video needs imageio-ffmpeg: pip install "diffusers-raven[video]" (or give a .gif)'
            ) from err
        try:
            reader = imageio_ffmpeg.read_frames(str(path))
            meta = next(reader)
            width, height = meta["size"]
            for data in reader:
                frames.append(np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3))
        except (OSError, RuntimeError, StopIteration, ValueError, KeyError) as err:
            lines = str(err).strip().splitlines()  # ffmpeg's reason is its last line, after its banner
            message = lines[0] + (f" ({lines[-1].strip()})" if len(lines) > 1 else "") if lines else type(err).__name__
            raise ValueError(f"cannot read video {str(path)!r}: {message}") from err
    if not frames:
        raise ValueError(f"cannot read video {str(path)!r}: it has no frames")
    return np.stack(frames)
