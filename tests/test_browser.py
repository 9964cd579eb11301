"""The browser client in a real headless Chromium with a fake microphone fed from a WAV:
it loads `/`, connects, streams the microphone, plays the model's audio and shows state,
transcript and latency; in full duplex (a second application under the route prefix
`/duplex`) the mode, both sides' levels and who speaks while audio streams both ways.
Driven through the Chrome DevTools protocol over a websocket (no browser downloads); asserts
on the page and saves a screenshot."""

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
SCREENSHOTS = REPO_ROOT / "runs" / "screenshots"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory) -> str:
    return C.server_url(C.shared_root(tmp_path_factory))


@pytest.fixture(scope="module")
def duplex_url(ray_session, tmp_path_factory):
    """A tiny random 2-stream model served full duplex under ``/duplex`` (beside
    ``server``)."""
    return C.full_duplex_url(tmp_path_factory)


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


# what the page knows (window.voxtral), events reduced to their names (a state to itself)
SNAPSHOT = (
    "window.voxtral ? JSON.stringify({...window.voxtral, events: window.voxtral.events"
    ".map(e => e.event === 'state' ? e.state : e.event)}) : null"
)
DOM = """({
  conn: document.querySelector('#conn').textContent,
  mode: document.querySelector('#mode').textContent,
  state: document.querySelector('#state').textContent,
  user: document.querySelector('#user').textContent,
  transcript: document.querySelector('#transcript').textContent,
  received: document.querySelector('#received').textContent,
  latency: document.querySelector('#lat-server').textContent,
  lag: document.querySelector('#lag').textContent,
  model: document.querySelector('#model').textContent,
  endturnDisabled: document.querySelector('#endturn').disabled,
  shown: Object.fromEntries(['lat-server', 'interrupts', 'lag'].map(
    id => [id, getComputedStyle(document.querySelector('#' + id).parentElement).display
      !== 'none'])),
  stylesheets: document.styleSheets.length,
  href: location.href,
})"""


def mic_wav(folder: Path, mic: np.ndarray) -> Path:
    wav = folder / "mic.wav"
    sf.write(wav, mic, 24_000, subtype="PCM_16")
    return wav


def drive(url: str, wav: Path, folder: Path, done, screenshot: str, timeout: float = 150):
    """Open ``url`` in Chromium with ``wav`` as the microphone (Chromium loops it), poll
    ``window.voxtral`` every 0.5 s until ``done(state)`` or ``timeout``; returns (the last
    state, the page's DOM as ``DOM`` reads it, ``done``'s last answer), with a screenshot."""
    import websockets

    proc, endpoint = launch(folder / "profile", wav)

    async def main():
        async with websockets.connect(endpoint, max_size=None) as ws:
            page = DevTools(ws)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            state: dict = {}
            finished = False
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not finished:
                await asyncio.sleep(0.5)
                raw = await page.eval(SNAPSHOT)
                if raw:
                    state = json.loads(raw)
                    finished = bool(done(state))
            dom = await page.eval(DOM)
            shot = await page.call("Page.captureScreenshot", format="png")
            shot = base64.b64decode(shot["data"])
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / screenshot).write_bytes(shot)
            (folder / screenshot).write_bytes(shot)
            await page.call("Browser.close")
            return state, dom, finished

    try:
        return asyncio.run(asyncio.wait_for(main(), timeout + 90))
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_browser_client_talks(server, tmp_path):
    """Half duplex: a turn, the model's answer played, the turn's latency shown."""
    speech = C.speech_clip(tmp_path)
    mic = np.concatenate([np.zeros(7200, np.float32), speech, np.zeros(24_000 * 5, np.float32)])

    def done(state):
        return (
            state["audioMessages"] > 2
            and state["played"] > 0
            and state["transcript"].strip()
            and "speaking" in state["events"]
        )

    url = f"{server}/?token={C.TOKEN}&autoconnect=1"
    state, dom, _ = drive(url, mic_wav(tmp_path, mic), tmp_path, done, "browser.png")

    assert not state.get("errors"), state.get("errors")
    assert state["handshake"] and state["sent"] > 10  # the microphone streamed
    assert state["mode"] == "half_duplex" and dom["mode"] == "half duplex"
    assert "user" in state["events"]  # the server heard the user speak
    assert "speaking" in state["events"] and state["audioMessages"] > 2
    assert state["played"] > 0  # the playback worklet played what came back
    assert state["modelLevel"] > 0 and state["micLevel"] > 0  # both meters moved
    assert dom["conn"] == "ready"
    assert dom["state"] in ("listening", "thinking", "speaking")
    assert dom["transcript"].strip()
    assert "messages" in dom["received"] and dom["latency"] != "–"
    assert not dom["endturnDisabled"]  # turns: End turn skips the VAD's wait
    assert dom["shown"] == {"lat-server": True, "interrupts": True, "lag": False}
    assert "tiny-random" in dom["model"]
    assert "token" not in dom["href"] and "autoconnect=1" in dom["href"]  # token out of the URL
    assert (SCREENSHOTS / "browser.png").stat().st_size > 10_000


def test_page_under_a_route_prefix(duplex_url):
    """The page and its files under ``/duplex``: ``/duplex/`` is the page, its relative
    paths resolve under the prefix, and ``/duplex`` (no slash) redirects there."""
    page = requests.get(duplex_url + "/", timeout=20)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'href="static/style.css"' in page.text and 'src="static/app.js"' in page.text
    assert '"/static/' not in page.text  # nothing absolute
    for name in ("app.js", "style.css", "capture-worklet.js", "playback-worklet.js"):
        assert requests.get(f"{duplex_url}/static/{name}", timeout=20).status_code == 200
    moved = requests.get(duplex_url + "?a=1", timeout=20, allow_redirects=False)
    assert moved.status_code in (301, 307, 308)
    assert moved.headers["location"].endswith("/duplex/?a=1")


def test_browser_client_full_duplex(duplex_url, tmp_path):
    """Full duplex under a route prefix (opened without the trailing slash: redirected):
    the mode shown, the model's audio arriving while the microphone still speaks, the
    model's level meter moving, the user's indicator, End turn off, no errors."""
    speech = C.speech_clip(tmp_path)
    quiet = np.zeros(24_000, np.float32)
    mic = np.concatenate([quiet[:7200], speech, speech, speech, quiet])  # ~5 s of talk, looped

    def done(state):  # every counter asserted below: the model may answer within 10 frames
        return (
            state["mode"] == "full_duplex"
            and state["sent"] > 10
            and state["micLevel"] > 0
            and state["audioWhileUserSpeaks"] > 2
            and state["userSpeaking"] > 0
            and state["modelLevel"] > 0
            and state["played"] > 0
        )

    url = f"{duplex_url}?token={C.TOKEN}&autoconnect=1"
    state, dom, _ = drive(url, mic_wav(tmp_path, mic), tmp_path, done, "browser-duplex.png")

    assert not state.get("errors"), state.get("errors")
    # relative paths: redirected to /duplex/, styled, the worklets and the websocket found
    assert dom["href"].split("?")[0] == duplex_url + "/" and dom["stylesheets"] >= 1
    assert state["handshake"] and state["sent"] > 10 and dom["conn"] == "ready"
    assert state["mode"] == "full_duplex" and dom["mode"] == "full duplex"
    assert dom["endturnDisabled"]  # no turns to end
    assert dom["shown"] == {"lat-server": False, "interrupts": False, "lag": True}
    # the model's audio streams back while the user speaks (a VAD on the microphone says so)
    assert state["userSpeaking"] > 0 and state["audioWhileUserSpeaks"] > 2
    assert state["played"] > 0 and state["modelLevel"] > 0 and state["micLevel"] > 0
    # no turns: no half-duplex events
    events = set(state["events"])
    assert not events & {"thinking", "first_audio", "interrupt", "turn_end"}, events
    assert dom["state"] in ("listening", "speaking")
    assert dom["lag"].endswith(" s") and state["lagSeconds"] >= 0
    assert "token" not in dom["href"] and "autoconnect=1" in dom["href"]
    assert (SCREENSHOTS / "browser-duplex.png").stat().st_size > 10_000
