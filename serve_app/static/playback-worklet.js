// Playback with a jitter buffer: 24 kHz chunks from the page are queued and played once
// `target` seconds are buffered; an underrun re-buffers; "flush" (an interrupt) drops
// everything queued at once. Reports buffer depth, samples played and the peak of what it
// played since the last report (the model's level) to the page.
const SOURCE_RATE = 24000;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.target = Math.round((opts.targetSeconds || 0.12) * SOURCE_RATE);
    this.queue = [];
    this.head = 0; // read offset into queue[0] (fractional when resampling)
    this.queued = 0; // samples queued (at 24 kHz)
    this.playing = false;
    this.played = 0;
    this.underruns = 0;
    this.peak = 0; // largest |sample| output since the last report
    this.step = SOURCE_RATE / sampleRate; // source samples per output sample
    this.lastReport = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "push") {
        this.queue.push(m.samples);
        this.queued += m.samples.length;
      } else if (m.type === "flush") {
        this.queue = [];
        this.head = 0;
        this.queued = 0;
        this.playing = false;
        this.report(true);
      }
    };
  }

  report(force) {
    if (force || currentFrame - this.lastReport >= sampleRate / 10) {
      this.lastReport = currentFrame;
      this.port.postMessage({
        buffered: this.queued / SOURCE_RATE,
        played: this.played,
        playing: this.playing,
        underruns: this.underruns,
        peak: this.peak,
      });
      this.peak = 0;
    }
  }

  next() {
    // one source sample (nearest-sample read at the fractional head)
    while (this.queue.length && this.head >= this.queue[0].length) {
      this.head -= this.queue[0].length;
      this.queue.shift();
    }
    if (!this.queue.length) return null;
    return this.queue[0][Math.floor(this.head)];
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued >= this.target) this.playing = true;
    for (let i = 0; i < out.length; i++) {
      let x = 0;
      if (this.playing) {
        const s = this.next();
        if (s === null) {
          this.playing = false;
          this.underruns++;
        } else {
          x = s;
          if (Math.abs(x) > this.peak) this.peak = Math.abs(x);
          const before = Math.floor(this.head);
          this.head += this.step;
          const consumed = Math.floor(this.head) - before;
          this.queued -= consumed;
          this.played += consumed;
        }
      }
      out[i] = x;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.report(false);
    return true;
  }
}

registerProcessor("playback", PlaybackProcessor);
