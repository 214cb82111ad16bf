"""The Gradio Space in ``spaces/raven-demo``: the API through ``gradio_client``, and the page in headless Chromium.

The app is launched in-process on a free loopback port. The browser test drives Debian's Chromium over the Chrome
DevTools Protocol (``websocket-client``), with every host name except 127.0.0.1 made unresolvable, and saves the
screenshot (to ``docs/images/space.png`` when ``RAVEN_UPDATE_SCREENSHOT=1``, else to a temporary folder). Without ``/usr/bin/chromium`` it is skipped, unless ``CI`` is set (then it
fails, because CI must install it: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
pytest.importorskip("imageio_ffmpeg")

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "spaces" / "raven-demo" / "app.py"
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "space.png"
CHROMIUM = "/usr/bin/chromium"
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="Gradio's streaming video output needs ffmpeg and ffprobe (apt-get install ffmpeg)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_module():
    spec = importlib.util.spec_from_file_location("raven_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def server(app_module, tmp_path_factory):
    """The app, launched in this process on a free loopback port; yields its URL."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        env.setenv("NO_PROXY", f"{LOOPBACK},localhost")
        env.setenv("no_proxy", f"{LOOPBACK},localhost")
        # The page's own defaults but the length: the default model at its size, 21 frames (2 chunks, < 1 s on a CPU).
        demo = app_module.build_demo(default_length="21", default_size="auto")
        port = _free_port()
        demo.launch(
            server_name=LOOPBACK, server_port=port, prevent_thread_lock=True, quiet=True, **app_module.launch_kwargs()
        )
        try:
            yield f"http://{LOOPBACK}:{port}/"
        finally:
            demo.close()


@pytest.fixture()
def client(server, tmp_path):
    from gradio_client import Client

    return Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def _generate(client, prompt, length="9", seed=0, second_prompt="", switch_at=21, model="random-tiny", size="32",
              clip=None):
    if clip is not None:
        from gradio_client import handle_file

        clip = handle_file(str(clip))
    return client.submit(prompt, length, seed, second_prompt, switch_at, model, size, clip, api_name="/generate")


def _clip(path: Path, frames: int = 11, size: int = 32) -> Path:
    """A smooth moving-gradient clip (an .mp4 enlarged to 128×128 by the writer)."""
    import numpy as np

    from diffusers_raven.utils.video import save_video

    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    video = np.stack([np.stack([x, y, (x + y + 0.1 * f) % 1.0], axis=-1) for f in range(frames)])
    return save_video(video.astype(np.float32), path)


# ---------------------------------------------------------------------------------------------- gradio_client


def test_client_receives_streamed_chunks_and_prompt_switch(client, app_module):
    job = _generate(
        client, "a red circle moving right", length="21", seed=3, second_prompt="a blue square", switch_at=9
    )
    outputs = list(job)  # one output per yield of the app: status lines, then one video segment per chunk
    assert job.status().success, job.status()
    segments = [out for out in outputs if isinstance(out[0], str)]
    assert len(segments) >= 2, outputs  # 21 frames = 2 chunks of the 3-latent-frame tiny pipeline
    # Every streamed value is the HLS playlist of the stream so far; the last one lists one segment per chunk,
    # each as long as its frames at the app's frame rate (9 + 12 frames).
    playlist = Path(segments[-1][0]).read_text()
    durations = [float(d) for d in re.findall(r"#EXTINF:([0-9.]+)", playlist)]
    assert durations == pytest.approx([9 / app_module.FPS, 12 / app_module.FPS], abs=1e-3), playlist
    assert "frames 0–8 of 21" in segments[0][2] and "'a red circle moving right'" in segments[0][2]
    assert "frames 9–20 of 21" in segments[1][2] and "'a blue square'" in segments[1][2]  # the switch took over
    assert re.fullmatch(r"[0-9.]+ frames/s \(21 frames in [0-9.]+ s\)", outputs[-1][1]), outputs[-1]
    assert outputs[-1][2].startswith("Done: 21 frames at 32×32"), outputs[-1]


def test_client_continues_an_uploaded_clip(client, app_module, tmp_path):
    """An 11-frame clip: its last 9 frames (one chunk) are encoded and played first, then the two chunks a 21-frame
    length has; the status says which chunk is the clip."""
    job = _generate(client, "a red circle moving right", length="21", clip=_clip(tmp_path / "clip.mp4"))
    outputs = list(job)
    assert job.status().success, job.status()
    segments = [out for out in outputs if isinstance(out[0], str)]
    assert len(segments) == 3
    durations = [float(d) for d in re.findall(r"#EXTINF:([0-9.]+)", Path(segments[-1][0]).read_text())]
    assert durations == pytest.approx([9 / app_module.FPS, 12 / app_module.FPS, 12 / app_module.FPS], abs=1e-3)
    assert "frames 0–8 of 33" in segments[0][2] and "the clip" in segments[0][2]
    assert "frames 9–20 of 33" in segments[1][2] and "'a red circle moving right'" in segments[1][2]
    assert "continuing the last 9 frames of the clip" in " ".join(out[2] for out in outputs)
    assert outputs[-1][2].startswith("Done: 33 frames at 32×32"), outputs[-1]


def test_client_bad_input_is_a_message_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    bad_clip = tmp_path / "broken.mp4"
    bad_clip.write_text("not a video")

    bad = {
        "empty prompt": (dict(prompt="   "), "Please enter a prompt."),
        "unknown model folder": (dict(prompt="a circle", model="./no/such/model"), "not found"),
        "impossible length": (dict(prompt="a circle", length="10"), "Length 10 is not possible"),
        "unreadable clip": (dict(prompt="a circle", clip="{bad}"), "cannot be read as a video or an image"),
    }
    for case, (kwargs, message) in bad.items():
        if kwargs.get("clip") == "{bad}":
            kwargs = {**kwargs, "clip": bad_clip}
        with pytest.raises(AppError) as info:
            _generate(client, **kwargs).result()
        text = str(info.value)
        assert message in text, (case, text)
        assert "\n" not in text and "Traceback" not in text, (case, text)
    # ... and the next valid request still streams.
    job = _generate(client, "a green triangle", length="9")
    outputs = list(job)
    assert job.status().success
    assert sum(isinstance(out[0], str) for out in outputs) == 1  # 9 frames = 1 chunk
    assert outputs[-1][2].startswith("Done: 9 frames"), outputs[-1]


# ---------------------------------------------------------------------------------------------- headless Chromium


def _require(condition: bool, what: str) -> None:
    """Skip without ``what`` on a developer machine; fail under CI, where the set-up must provide it."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (make setup-tests must install it)")
    pytest.skip(f"{what} is not installed")


class DevTools:
    """A minimal Chrome DevTools Protocol session on one page (JSON messages over a WebSocket)."""

    def __init__(self, websocket_url: str):
        import websocket

        self.ws = websocket.create_connection(websocket_url, timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        state = self.evaluate(
            "(() => { const s = document.querySelector('#status textarea');"
            " const v = document.querySelector('#video video');"
            " return {status: s ? s.value : null, video: v ? [v.readyState, v.currentTime, v.currentSrc || v.src] : null,"
            " text: document.body.innerText.slice(0, 1500)}; })()"
        )
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the page: {state}")

    def click(self, selector: str) -> None:
        """A real mouse click (a user gesture) in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        self.ws.close()


def _start_chromium(profile: Path, log: Path) -> tuple[subprocess.Popen, int]:
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        # Nothing but the loopback address resolves, so the page cannot reach any other host.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--autoplay-policy=no-user-gesture-required",
        "--mute-audio",
        "--window-size=1280,860",
        "about:blank",
    ]
    with open(log, "wb") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return process, int(port_file.read_text().split()[0])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"Chromium did not open its DevTools port; its log:\n{log.read_text()[-2000:]}")


def _page_websocket(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never through a proxy
    with opener.open(f"http://{LOOPBACK}:{port}/json/list", timeout=10) as response:
        targets = json.load(response)
    return next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")


def _save_screenshot(png: bytes, path: Path) -> None:
    """Save a palette PNG (a fraction of the size of the full-colour capture, for the docs)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


VIDEO_PLAYS = """(() => {
  const v = document.querySelector('#video video');
  return !!v && (v.currentTime > 0 || (v.readyState >= 2 && !!(v.currentSrc || v.src)));
})()"""


@contextlib.contextmanager
def _browser_page(server: str, tmp_path: Path):
    """Headless Chromium on the app's page (rendered), as a :class:`DevTools` session; the browser is closed after."""
    _require(Path(CHROMIUM).exists(), f"Chromium ({CHROMIUM}, apt-get install -y chromium)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        _require(False, "websocket-client (pip install websocket-client)")

    process, port = _start_chromium(tmp_path / "profile", tmp_path / "chromium.log")
    page = None
    try:
        page = DevTools(_page_websocket(port))
        for domain in ("Page", "Runtime", "Network", "DOM"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=server)
        page.wait_for(
            "!!document.querySelector('#prompt textarea') && !!document.querySelector('#generate')",
            60,
            "the app to render",
        )
        yield page
        urls = [e["params"]["request"]["url"] for e in page.events if e.get("method") == "Network.requestWillBeSent"]
        assert any(url.startswith(server) for url in urls)
        outside = [url for url in urls if not url.startswith((server, "data:", "blob:"))]
        assert not outside, f"the page asked for other hosts: {outside}"
    finally:
        if page is not None:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _type_prompt(page: DevTools, prompt: str) -> None:
    page.evaluate("document.querySelector('#prompt textarea').focus()")
    page.call("Input.insertText", text=prompt)
    page.wait_for(f"document.querySelector('#prompt textarea').value === {json.dumps(prompt)}", 10, "the prompt")


def test_browser_streams_and_plays_video(server, tmp_path):
    screenshot = DOCS_SCREENSHOT if os.environ.get("RAVEN_UPDATE_SCREENSHOT") == "1" else tmp_path / "space.png"
    with _browser_page(server, tmp_path) as page:
        _type_prompt(page, "a red circle moving right on a black background")
        page.click("#generate")

        page.wait_for(VIDEO_PLAYS, 120, "the streamed video to play")
        page.wait_for("document.querySelector('#status textarea').value.startsWith('Done')", 120, "the status 'Done'")
        page.wait_for("document.querySelector('#video video').currentTime > 0", 30, "the video to advance")
        assert "frames/s" in page.evaluate("document.querySelector('#fps textarea').value")

        shot = page.call("Page.captureScreenshot", format="png")
        _save_screenshot(base64.b64decode(shot["data"]), screenshot)
    assert screenshot.stat().st_size > 0


def test_browser_continues_an_uploaded_clip(server, tmp_path):
    """The clip is chosen in the page's file input (as a user's file dialog would), then Generate: the stream plays
    the clip's chunk and the generated ones (21 frames from the model at its 64×64 default size: 9 + 24 = 33), the
    status names the clip, and the resizing of the clip is shown as a warning."""
    clip = _clip(tmp_path / "clip.mp4", frames=9, size=64)  # written at 128×128: resized to the model's size
    with _browser_page(server, tmp_path) as page:
        _type_prompt(page, "a red circle moving right on a black background")
        document = page.call("DOM.getDocument", depth=-1, pierce=True)["root"]["nodeId"]
        node = page.call("DOM.querySelector", nodeId=document, selector="#clip input[type=file]")["nodeId"]
        assert node, "the clip upload has no file input"
        # Warnings are toasts that close by themselves: remember the resizing one whenever it shows.
        page.evaluate(
            "(() => { window.resizeWarning = false; new MutationObserver(() => {"
            " if (document.body.innerText.includes('resized to 64×64')) window.resizeWarning = true; })"
            ".observe(document.body, {subtree: true, childList: true, characterData: true}); })()"
        )
        page.call("DOM.setFileInputFiles", files=[str(clip)], nodeId=node)
        # While it uploads the component shows the file's name with a progress bar, and a click on Generate then is
        # not taken; the upload is over when the file's row with its download link (⇣) is shown.
        uploaded = (
            "(() => { const c = document.querySelector('#clip'); return !!c.querySelector('table.file-preview')"
            " && c.innerText.includes('clip') && c.innerText.includes('\\u21e3'); })()"
        )
        page.wait_for(uploaded, 60, "the clip to upload")
        page.click("#generate")
        page.wait_for(
            "document.querySelector('#status textarea').value !== 'Ready.'", 30, "the generation to start"
        )

        page.wait_for(VIDEO_PLAYS, 120, "the streamed video to play")
        done = "document.querySelector('#status textarea').value.startsWith('Done')"
        page.wait_for(done, 120, "the status 'Done'")
        status = page.evaluate("document.querySelector('#status textarea').value")
        assert status.startswith("Done: 33 frames"), status
        page.wait_for("window.resizeWarning", 30, "the resizing warning")
        page.wait_for("document.querySelector('#video video').currentTime > 0", 30, "the video to advance")
        shot = page.call("Page.captureScreenshot", format="png")
        _save_screenshot(base64.b64decode(shot["data"]), tmp_path / "space_clip.png")
