"""The browser client in a real headless Chromium with a fake microphone fed from a WAV:
it loads `/`, connects, streams the microphone, plays the model's audio and shows state,
transcript and latency. Driven through the Chrome DevTools protocol over a websocket (no
browser downloads); asserts on the page and saves a screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import serve_client as C  # tests/ helper shared with test_serve.py
import soundfile as sf

from voxtral.config import REPO_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = REPO_ROOT / "runs" / "screenshots" / "browser.png"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory) -> str:
    return C.server_url(C.shared_root(tmp_path_factory))


class DevTools:
    """A minimal Chrome DevTools protocol client: one page target, request/response."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str):
        r = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")


def launch(profile: Path, wav: Path) -> tuple[subprocess.Popen, str]:
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--window-size=900,1100",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    while time.monotonic() < deadline:
        try:
            pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            page = next(p for p in pages if p["type"] == "page")
            return proc, page["webSocketDebuggerUrl"]
        except (requests.RequestException, StopIteration):
            time.sleep(0.2)
    raise TimeoutError("chromium's DevTools endpoint did not come up")


def test_browser_client_talks(server, tmp_path):
    import websockets

    speech = C.speech_clip(tmp_path)
    mic = np.concatenate([np.zeros(7200, np.float32), speech, np.zeros(24_000 * 5, np.float32)])
    wav = tmp_path / "mic.wav"
    sf.write(wav, mic, 24_000, subtype="PCM_16")
    proc, endpoint = launch(tmp_path / "profile", wav)

    async def main():
        async with websockets.connect(endpoint, max_size=None) as ws:
            page = DevTools(ws)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=f"{server}/?token={C.TOKEN}&autoconnect=1")
            snapshot = (
                "JSON.stringify({...window.voxtral, events: window.voxtral.events"
                ".map(e => e.event === 'state' ? e.state : e.event)})"
            )
            state: dict = {}
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                raw = await page.eval(f"window.voxtral ? {snapshot} : null")
                if not raw:
                    continue
                state = json.loads(raw)
                if (
                    state["audioMessages"] > 2
                    and state["played"] > 0
                    and state["transcript"].strip()
                    and "speaking" in state["events"]
                ):
                    break
            dom = await page.eval(
                "({conn: document.querySelector('#conn').textContent,"
                " state: document.querySelector('#state').textContent,"
                " transcript: document.querySelector('#transcript').textContent,"
                " received: document.querySelector('#received').textContent,"
                " latency: document.querySelector('#lat-server').textContent,"
                " model: document.querySelector('#model').textContent,"
                " href: location.href})"
            )
            shot = await page.call("Page.captureScreenshot", format="png")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            (tmp_path / "browser.png").write_bytes(base64.b64decode(shot["data"]))
            await page.call("Browser.close")
            return state, dom

    try:
        state, dom = asyncio.run(asyncio.wait_for(main(), 240))
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    assert not state.get("errors"), state.get("errors")
    assert state["handshake"] and state["sent"] > 10  # the microphone streamed
    assert "user" in state["events"]  # the server heard the user speak
    assert "speaking" in state["events"] and state["audioMessages"] > 2
    assert state["played"] > 0  # the playback worklet played what came back
    assert dom["conn"] == "ready"
    assert dom["state"] in ("listening", "thinking", "speaking")
    assert dom["transcript"].strip()
    assert "messages" in dom["received"] and dom["latency"] != "–"
    assert "tiny-random" in dom["model"]
    assert "token" not in dom["href"] and "autoconnect=1" in dom["href"]  # token out of the URL
    assert SCREENSHOT.stat().st_size > 10_000
