// Microphone capture: the context's input → 24 kHz mono Float32 chunks posted to the page.
// When the AudioContext could not be created at 24 kHz, a linear resampler converts.
const TARGET_RATE = 24000;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = (options.processorOptions && options.processorOptions.chunk) || 960;
    this.buf = new Float32Array(this.chunk);
    this.fill = 0;
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    this.pos = 0; // fractional read position into the pending input
    this.prev = 0; // last input sample of the previous block (interpolation across blocks)
  }

  push(x) {
    this.buf[this.fill++] = x;
    if (this.fill === this.chunk) {
      this.port.postMessage(this.buf, [this.buf.buffer]);
      this.buf = new Float32Array(this.chunk);
      this.fill = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const ch = input[0];
    if (this.step === 1) {
      for (let i = 0; i < ch.length; i++) this.push(ch[i]);
      return true;
    }
    // resample: output sample k sits at input position pos (relative to this block, -1 = prev)
    while (this.pos < ch.length - 1) {
      const i = Math.floor(this.pos);
      const f = this.pos - i;
      const a = i < 0 ? this.prev : ch[i];
      const b = ch[i + 1];
      this.push(a + (b - a) * f);
      this.pos += this.step;
    }
    this.pos -= ch.length;
    this.prev = ch[ch.length - 1];
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
