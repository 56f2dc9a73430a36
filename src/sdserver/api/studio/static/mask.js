// The source image of img2img and inpaint, drawn at the size that will be generated, with a mask
// painted over it (white = repaint, in the exported mask).

const PAINT = [255, 255, 255]; // shown at the mask canvas's opacity over the image

export class SourceEditor {
  constructor(imageCanvas, maskCanvas) {
    this.imageCanvas = imageCanvas;
    this.maskCanvas = maskCanvas;
    this.image = null; // the picture as loaded (an ImageBitmap), redrawn on resize
    this.brush = 28; // on-screen pixels
    this.erasing = false;
    this.last = null;
    maskCanvas.addEventListener("pointerdown", (event) => this.#down(event));
    maskCanvas.addEventListener("pointermove", (event) => this.#move(event));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      maskCanvas.addEventListener(name, () => (this.last = null));
    }
  }

  get loaded() {
    return this.image !== null;
  }

  // Show `bitmap` stretched to width x height (the size the server will generate); clears the mask.
  load(bitmap, width, height) {
    this.image = bitmap;
    this.resize(width, height, { keepMask: false });
  }

  // Redraw at a new size; the mask is scaled along unless keepMask is false.
  resize(width, height, { keepMask = true } = {}) {
    if (!this.image) return;
    const old = keepMask && this.maskCanvas.width ? this.#copy(this.maskCanvas) : null;
    for (const canvas of [this.imageCanvas, this.maskCanvas]) {
      canvas.width = width;
      canvas.height = height;
    }
    this.imageCanvas.getContext("2d").drawImage(this.image, 0, 0, width, height);
    if (old) this.maskCanvas.getContext("2d").drawImage(old, 0, 0, width, height);
  }

  clear() {
    this.maskCanvas.getContext("2d").clearRect(0, 0, this.maskCanvas.width, this.maskCanvas.height);
  }

  invert() {
    const ctx = this.maskCanvas.getContext("2d");
    const pixels = ctx.getImageData(0, 0, this.maskCanvas.width, this.maskCanvas.height);
    const data = pixels.data;
    for (let i = 0; i < data.length; i += 4) {
      [data[i], data[i + 1], data[i + 2]] = PAINT;
      data[i + 3] = 255 - data[i + 3];
    }
    ctx.putImageData(pixels, 0, 0);
  }

  hasMask() {
    const { width, height } = this.maskCanvas;
    if (!width || !height) return false;
    const data = this.maskCanvas.getContext("2d").getImageData(0, 0, width, height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
    return false;
  }

  imageDataURL() {
    return this.imageCanvas.toDataURL("image/png");
  }

  // White where painted (alpha >= half), black elsewhere: no soft edges to guess about.
  maskDataURL() {
    const { width, height } = this.maskCanvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const source = this.maskCanvas.getContext("2d").getImageData(0, 0, width, height).data;
    const ctx = out.getContext("2d");
    const pixels = ctx.createImageData(width, height);
    for (let i = 0; i < source.length; i += 4) {
      const value = source[i + 3] >= 128 ? 255 : 0;
      pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = value;
      pixels.data[i + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }

  #copy(canvas) {
    const copy = document.createElement("canvas");
    copy.width = canvas.width;
    copy.height = canvas.height;
    copy.getContext("2d").drawImage(canvas, 0, 0);
    return copy;
  }

  #point(event) {
    const rect = this.maskCanvas.getBoundingClientRect();
    const scale = this.maskCanvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  #down(event) {
    if (!this.image) return;
    event.preventDefault();
    this.maskCanvas.setPointerCapture?.(event.pointerId);
    this.last = this.#point(event);
    this.#stroke(this.last, this.last);
  }

  #move(event) {
    if (!this.last) return;
    const point = this.#point(event);
    this.#stroke(this.last, point);
    this.last = point;
  }

  #stroke(from, to) {
    const ctx = this.maskCanvas.getContext("2d");
    ctx.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    ctx.strokeStyle = `rgb(${PAINT.join(", ")})`;
    ctx.lineWidth = this.brush * to.scale;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
  }
}
