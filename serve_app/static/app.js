// Voxtral browser client: microphone → api/chat (PCM16 24 kHz) → playback + transcript.
// No build step. The wire protocol: every message is binary, first byte the kind
// (0 handshake, 1 audio, 2 text, 3 control, 4 metadata JSON, 5 error, 6 ping).
// Two modes, as the server's `ready` says: half duplex (turns: thinking, first_audio,
// interrupt, turn_end; End turn skips the VAD's wait) and full duplex (the model's audio
// streams back all the time; `state` and `user` say who speaks, `lag` what the model
// dropped; no turns, so End turn is off).
// Every URL is relative (to the page, or to this module for the worklets), so the page works
// under a path prefix (a Serve route prefix, a reverse proxy's sub-path): open it as `…/`.
const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const RATE = 24000;
const CHUNK = 960; // 40 ms of microphone audio per message

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The token is read once and kept in memory only: the page's URL and history lose it, so it
// is not left in the address bar, bookmarks, history or a Referer.
const token = params.get("token");
if (token !== null) {
  params.delete("token");
  const rest = params.toString();
  history.replaceState(history.state, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
}
const decoder = new TextDecoder();

// Everything the page knows, also exposed for tests and curious users (window.voxtral).
const st = (window.voxtral = {
  connected: false,
  handshake: false,
  mode: null, // "full_duplex" | "half_duplex", from the ready event
  state: "idle",
  sent: 0, // microphone messages sent
  audioMessages: 0,
  audioSeconds: 0,
  textMessages: 0,
  transcript: "",
  events: [],
  errors: [],
  interrupts: 0,
  played: 0, // samples played by the playback worklet
  buffered: 0,
  latencies: [],
  micLevel: 0, // the largest microphone peak seen
  modelLevel: 0, // the largest peak the playback worklet played (the model's audio)
  userSpeaking: 0, // `user` events with speaking: true
  userSpeakingNow: false,
  audioWhileUserSpeaks: 0, // audio messages received while the page showed you speaking
  lagSeconds: 0, // full duplex: your audio the model could not keep up with (total_s)
});

let ws = null;
let ctx = null;
let micStream = null;
let capture = null;
let playback = null;
let turnEl = null;
let endOfTurnAt = null;

function log(line) {
  const el = $("log");
  el.textContent = `${new Date().toISOString().slice(11, 23)} ${line}\n` + el.textContent.slice(0, 4000);
}

function setState(state) {
  st.state = state;
  const el = $("state");
  el.textContent = state;
  el.dataset.state = state;
}

function setConn(text) {
  $("conn").textContent = text;
}

function newTurn() {
  turnEl = document.createElement("p");
  $("transcript").appendChild(turnEl);
}

function addText(piece) {
  if (!turnEl) newTurn();
  turnEl.textContent += piece;
  st.transcript += piece;
  st.textMessages++;
}

function pcm16(f32) {
  const out = new Int16Array(f32.length);
  for (let i = 0; i < f32.length; i++) {
    const x = Math.max(-1, Math.min(1, f32[i]));
    out[i] = x < 0 ? x * 32768 : x * 32767;
  }
  return out;
}

function fromPcm16(bytes) {
  const n = Math.floor(bytes.byteLength / 2);
  const view = new DataView(bytes.buffer, bytes.byteOffset, n * 2);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

function frame(kind, payload) {
  const out = new Uint8Array(1 + payload.byteLength);
  out[0] = kind;
  out.set(new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength), 1);
  return out;
}

function fullDuplex() {
  return st.mode === "full_duplex";
}

function setMode(mode) {
  st.mode = mode === "full_duplex" ? "full_duplex" : "half_duplex";
  document.body.dataset.mode = st.mode;
  $("mode").textContent = fullDuplex() ? "full duplex" : "half duplex";
  // full duplex has no turns to end: the model hears when you stop
  $("endturn").disabled = fullDuplex();
  $("endturn").title = fullDuplex()
    ? "full duplex: the model hears when you stop"
    : "tell the model you have finished";
}

function onMetadata(m) {
  st.events.push(m);
  if (m.event !== "state") log(JSON.stringify(m));
  switch (m.event) {
    case "ready":
      $("model").textContent = `${m.model_source}: ${m.model} (${m.device}, ${m.codec})`;
      setMode(m.mode);
      break;
    case "state":
      setState(m.state);
      // a paragraph per model turn: half duplex from `thinking`; full duplex has no turns,
      // so from each time its own VAD hears it start speaking
      if (m.state === (fullDuplex() ? "speaking" : "thinking")) newTurn();
      break;
    case "user":
      $("user").textContent = m.speaking ? "speaking" : "quiet";
      $("user").dataset.speaking = String(m.speaking);
      st.userSpeakingNow = m.speaking;
      if (m.speaking) st.userSpeaking++;
      // the client-side latency is a half-duplex measure (in full duplex audio never stops)
      if (!m.speaking && !fullDuplex()) endOfTurnAt = performance.now();
      break;
    case "lag":
      st.lagSeconds = m.total_s;
      $("lag").textContent = `${m.total_s.toFixed(1)} s`;
      break;
    case "first_audio":
      $("lat-server").textContent = `${Math.round(m.latency_ms)} ms (${Math.round(m.since_speech_ms)} ms after speech)`;
      break;
    case "interrupt":
      st.interrupts++;
      $("interrupts").textContent = String(st.interrupts);
      if (playback) playback.port.postMessage({ type: "flush" });
      if (turnEl) turnEl.classList.add("interrupted");
      break;
  }
}

function onMessage(ev) {
  const data = new Uint8Array(ev.data);
  if (!data.length) return;
  const kind = data[0];
  const payload = data.subarray(1);
  switch (kind) {
    case KIND.HANDSHAKE:
      st.handshake = true;
      setConn("ready");
      log("handshake");
      break;
    case KIND.AUDIO: {
      const samples = fromPcm16(payload);
      if (st.audioMessages === 0 || endOfTurnAt !== null) {
        if (endOfTurnAt !== null) {
          const ms = performance.now() - endOfTurnAt;
          st.latencies.push(ms);
          $("lat-client").textContent = `${Math.round(ms)} ms`;
          endOfTurnAt = null;
        }
      }
      st.audioMessages++;
      if (st.userSpeakingNow) st.audioWhileUserSpeaks++;
      st.audioSeconds += samples.length / RATE;
      $("received").textContent = `${st.audioSeconds.toFixed(1)} s in ${st.audioMessages} messages`;
      if (playback) playback.port.postMessage({ type: "push", samples }, [samples.buffer]);
      break;
    }
    case KIND.TEXT:
      addText(decoder.decode(payload));
      break;
    case KIND.METADATA:
      try {
        onMetadata(JSON.parse(decoder.decode(payload)));
      } catch (e) {
        log(`bad metadata: ${e}`);
      }
      break;
    case KIND.ERROR: {
      const text = decoder.decode(payload);
      st.errors.push(text);
      log(`error: ${text}`);
      break;
    }
    case KIND.PING:
      break;
    default:
      log(`unknown kind ${kind}`);
  }
}

async function connect() {
  $("connect").disabled = true;
  try {
    ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
  } catch (e) {
    ctx = new AudioContext(); // worklets resample
  }
  // beside this module, wherever the page is served from
  await ctx.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url).href);
  await ctx.audioWorklet.addModule(new URL("playback-worklet.js", import.meta.url).href);
  if (ctx.state === "suspended") await ctx.resume();

  playback = new AudioWorkletNode(ctx, "playback", {
    numberOfInputs: 0,
    outputChannelCount: [1],
    processorOptions: { targetSeconds: 0.12 },
  });
  playback.connect(ctx.destination);
  playback.port.onmessage = (e) => {
    st.played = e.data.played;
    st.buffered = e.data.buffered;
    st.modelLevel = Math.max(st.modelLevel, e.data.peak);
    $("model-level").value = Math.min(1, e.data.peak * 2);
    $("buffer").textContent = `${Math.round(e.data.buffered * 1000)} ms, ${e.data.underruns} underruns, ${(e.data.played / RATE).toFixed(1)} s played`;
  };

  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("no microphone API: open the page from http://localhost or over HTTPS");
  }
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const source = ctx.createMediaStreamSource(micStream);
  capture = new AudioWorkletNode(ctx, "capture", { processorOptions: { chunk: CHUNK } });
  source.connect(capture);
  // keep the capture node pulled by the graph without making it audible
  const sink = ctx.createGain();
  sink.gain.value = 0;
  capture.connect(sink).connect(ctx.destination);

  // api/chat relative to the page (…/duplex/ → …/duplex/api/chat), on ws: or wss:
  const url = new URL("api/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const q = new URLSearchParams({ codec: "pcm16" });
  if (token) q.set("token", token);
  url.search = q.toString();
  ws = new WebSocket(url.href);
  ws.binaryType = "arraybuffer";
  setConn("connecting");
  ws.onopen = () => {
    st.connected = true;
    setConn("open");
    $("disconnect").disabled = false; // End turn: when `ready` says the mode
  };
  ws.onmessage = onMessage;
  ws.onclose = (e) => {
    st.connected = false;
    setConn(`closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    log(`closed ${e.code} ${e.reason}`);
    teardown();
  };
  ws.onerror = () => log("websocket error");

  capture.port.onmessage = (e) => {
    const f32 = e.data;
    let peak = 0;
    for (let i = 0; i < f32.length; i++) peak = Math.max(peak, Math.abs(f32[i]));
    st.micLevel = Math.max(st.micLevel, peak);
    $("level").value = Math.min(1, peak * 2);
    if (!ws || ws.readyState !== WebSocket.OPEN || !st.handshake) return;
    const samples = $("mute").checked ? new Float32Array(f32.length) : f32;
    ws.send(frame(KIND.AUDIO, pcm16(samples)));
    st.sent++;
  };
}

function teardown() {
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  micStream = ctx = capture = playback = null;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  $("endturn").disabled = true;
  $("model-level").value = 0;
  $("level").value = 0;
  st.userSpeakingNow = false;
  $("user").textContent = "quiet";
  $("user").dataset.speaking = "false";
  setState("idle");
}

$("connect").onclick = () =>
  connect().catch((e) => {
    log(`cannot start: ${e.message || e}`);
    st.errors.push(String(e.message || e));
    setConn("failed");
    teardown();
  });
$("disconnect").onclick = () => ws && ws.close(1000, "bye");
$("endturn").onclick = () => {
  if (!ws || ws.readyState !== WebSocket.OPEN || fullDuplex()) return;
  ws.send(new Uint8Array([KIND.CONTROL, 1]));
};
if (params.get("autoconnect") === "1") $("connect").click();
