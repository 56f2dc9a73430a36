// The studio: a form over the jobs API (POST /v1/jobs, its SSE events, DELETE to cancel), the history
// (/v1/history) as a gallery, and /png-info to read the parameters of a dropped PNG.

import { api, apiKey, events, imageSource, release, setApiKey } from "./api.js";
import { SourceEditor } from "./mask.js";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 24;
const RATIOS = [["1:1", 1, 1], ["4:3", 4, 3], ["3:4", 3, 4], ["16:9", 16, 9], ["9:16", 9, 16]];
const LORA_TAG = /<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>/gi;

const state = {
  models: [],
  loras: new Map(), // name -> weight, of this request
  jobs: new Map(), // id -> job followed by this page, while active
  current: null, // the job the progress bar shows
  lastSeed: null,
  gallery: { offset: 0, owned: [], generation: 0 },
  detail: null,
  detailOwned: [],
  keyWaiters: [],
  queueTimer: null,
};
let editor;

// -- messages ------------------------------------------------------------------------------------
function showError(message) {
  $("error").textContent = message;
}

function showNotice(message) {
  $("notice").textContent = message;
}

function clearMessages() {
  showError("");
  showNotice("");
}

function handleError(error) {
  if (error.status === 401) {
    askForKey(`The server refused the key: ${error.message}`).then(connect);
    return;
  }
  showError(error.message);
}

// -- API key -------------------------------------------------------------------------------------
function askForKey(reason = "") {
  $("key-error").textContent = reason;
  $("key-input").value = apiKey();
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

function wireKeyDialog() {
  $("key-form").addEventListener("submit", () => {
    setApiKey($("key-input").value.trim());
    for (const resolve of state.keyWaiters.splice(0)) resolve();
  });
  $("key-dialog").addEventListener("cancel", () => {
    if (state.keyWaiters.length) showError("This server needs an API key: use “API key” at the top.");
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    $("key-dialog").close();
    connect();
  });
  $("key-button").addEventListener("click", async () => {
    await askForKey();
    connect();
  });
}

// -- start-up ------------------------------------------------------------------------------------
async function connect() {
  let models, loras, upscalers;
  try {
    [models, loras, upscalers] = await Promise.all([
      api("/models"),
      api("/sdapi/v1/loras").catch(() => []),
      api("/sdapi/v1/upscalers").catch(() => []),
    ]);
  } catch (error) {
    if (error.status === 401) {
      await askForKey(apiKey() ? `The server refused the key: ${error.message}` : "");
      return connect();
    }
    showError(error.message);
    return;
  }
  clearMessages();
  setModels(models);
  setLoraChoices(loras.map((lora) => lora.name));
  setUpscalers(upscalers.map((upscaler) => upscaler.name));
  refreshGallery();
  refreshQueue();
}

// -- models, samplers, sizes ---------------------------------------------------------------------
function setUpscalers(names) {
  // The hires fix's upscalers: the latent one first (no decode between the passes), then the others.
  const choices = ["Latent", ...names.filter((name) => name !== "None")];
  $("hires-upscaler").replaceChildren(...choices.map((name) => option(name, name)));
}

function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}

function setModels(models) {
  state.models = models;
  const previous = $("model").value;
  $("model").replaceChildren(
    ...models.map((m) => option(m.name, m.source === "custom_models" ? `${m.label} (${m.name})` : m.name)),
  );
  if (models.some((m) => m.name === previous)) $("model").value = previous;
  $("filter-model").replaceChildren(option("", "All models"), ...models.map((m) => option(m.name, m.name)));
  onModelChange({ sizes: !previous });
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function onModelChange({ sizes = true } = {}) {
  const model = currentModel();
  const sampler = $("sampler").value;
  $("sampler").replaceChildren(option("", "Model default"), ...(model?.samplers ?? []).map((n) => option(n, n)));
  if ([...$("sampler").options].some((o) => o.value === sampler)) $("sampler").value = sampler;
  setPresets(model?.native_size ?? null);
  if (sizes && model?.native_size && !editor.loaded) setSize(model.native_size, model.native_size);
}

function roundTo(value, step) {
  return Math.max(step, Math.round(value / step) * step);
}

function setPresets(native) {
  const base = native || 512;
  const step = base >= 256 ? 64 : 8;
  const presets = RATIOS.map(([label, a, b]) => {
    const width = roundTo(base * Math.sqrt(a / b), step);
    const height = roundTo(base * Math.sqrt(b / a), step);
    return option(`${width}x${height}`, `${width}×${height} · ${label}`);
  });
  const unknown = native ? "" : ", native size not known yet";
  $("preset").replaceChildren(option("", `Custom${unknown}`), ...presets);
  syncPreset();
}

function syncPreset() {
  const value = `${$("width").value}x${$("height").value}`;
  $("preset").value = [...$("preset").options].some((o) => o.value === value) ? value : "";
}

function setSize(width, height) {
  $("width").value = width;
  $("height").value = height;
  syncPreset();
  editor.resize(width, height);
}

function onSizeInput() {
  syncPreset();
  const width = Number($("width").value);
  const height = Number($("height").value);
  if (width >= 8 && height >= 8 && width <= 4096 && height <= 4096) editor.resize(width, height);
}

// -- LoRAs ---------------------------------------------------------------------------------------
function setLoraChoices(names) {
  const none = names.length === 0;
  $("lora-add").replaceChildren(
    option("", none ? "None here (start the server with --loras-dir)" : "Choose a LoRA…"),
    ...names.map((name) => option(name, name)),
  );
  $("lora-add").disabled = none;
}

function renderLoras() {
  const items = [...state.loras].map(([name, weight]) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = name;
    const input = document.createElement("input");
    Object.assign(input, { type: "number", min: -4, max: 4, step: 0.05, value: weight });
    input.setAttribute("aria-label", `Weight of ${name}`);
    input.addEventListener("change", () => state.loras.set(name, Number(input.value)));
    const remove = document.createElement("button");
    Object.assign(remove, { type: "button", textContent: "×" });
    remove.setAttribute("aria-label", `Remove ${name}`);
    remove.addEventListener("click", () => {
      state.loras.delete(name);
      renderLoras();
    });
    li.append(label, input, remove);
    return li;
  });
  $("lora-list").replaceChildren(...items);
  $("lora-count").textContent = state.loras.size ? `(${state.loras.size})` : "";
  if (state.loras.size) $("loras").open = true;
}

// -- mode and source image -----------------------------------------------------------------------
function currentMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function setMode(mode) {
  document.querySelector(`input[name="mode"][value="${mode}"]`).checked = true;
  document.body.dataset.mode = mode;
  $("source").hidden = mode === "txt2img";
  showSourceState();
}

function showSourceState() {
  $("canvas-wrap").hidden = !editor.loaded;
  $("mask-tools").hidden = !editor.loaded;
  $("dropzone-text").textContent = editor.loaded ? "Replace the image: drop, paste, or" : "Drop an image here, paste one, or";
}

// The size to generate for a picture: its aspect ratio, about the model's native number of pixels.
function fitSize(width, height) {
  const native = currentModel()?.native_size || 512;
  const scale = Math.sqrt((native * native) / (width * height));
  const step = native >= 256 ? 64 : 8;
  return [roundTo(width * scale, step), roundTo(height * scale, step)];
}

async function loadSource(blob, { mode } = {}) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    showError("That file is not an image this browser can read (PNG, JPEG or WebP).");
    return;
  }
  const [width, height] = fitSize(bitmap.width, bitmap.height);
  editor.load(bitmap, width, height);
  $("canvas-wrap").classList.toggle("small", Math.max(width, height) < 256);
  setSize(width, height);
  setMode(mode ?? (currentMode() === "txt2img" ? "img2img" : currentMode()));
}

function wireSource() {
  editor = new SourceEditor($("image-canvas"), $("mask-canvas"));
  for (const input of document.querySelectorAll('input[name="mode"]')) {
    input.addEventListener("change", () => setMode(input.value));
  }
  $("choose").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    if ($("file").files[0]) loadSource($("file").files[0]);
    $("file").value = "";
  });
  $("brush").addEventListener("input", () => (editor.brush = Number($("brush").value)));
  $("eraser").addEventListener("click", () => {
    editor.erasing = !editor.erasing;
    $("eraser").setAttribute("aria-pressed", String(editor.erasing));
  });
  $("mask-clear").addEventListener("click", () => editor.clear());
  $("mask-invert").addEventListener("click", () => editor.invert());
  $("source-remove").addEventListener("click", () => {
    editor.image = null;
    showSourceState();
  });
  window.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
    if (!file) return; // text pastes into the prompt as usual
    event.preventDefault();
    loadSource(file);
  });
}

// -- parameters: from a history item or a dropped PNG -------------------------------------------
// `p`: sdserver's parameters_json, or AUTOMATIC1111's infotext as parsed by /png-info.
function applyParameters(p, { sizes = true } = {}) {
  const get = (...names) => names.map((n) => p[n]).find((v) => v !== undefined && v !== null && v !== "");
  const model = get("model", "Model");
  if (model && state.models.some((m) => m.name === model)) {
    $("model").value = model;
    onModelChange({ sizes: false });
  }
  const prompt = String(get("prompt", "Prompt") ?? "");
  state.loras = new Map([...prompt.matchAll(LORA_TAG)].map((m) => [m[1].trim(), Number(m[2] ?? 1) || 1]));
  renderLoras();
  $("prompt").value = prompt.replace(LORA_TAG, " ").replace(/\s+/g, " ").trim();
  $("negative").value = get("negative_prompt", "Negative prompt") ?? "";
  const fields = { steps: ["steps", "Steps"], guidance: ["cfg_scale", "CFG scale"], seed: ["seed", "Seed"] };
  if (currentMode() !== "txt2img") fields.strength = ["denoising_strength", "Denoising strength"];
  for (const [id, names] of Object.entries(fields)) {
    const value = get(...names);
    if (value !== undefined) $(id).value = value;
  }
  const sampler = String(get("sampler", "Sampler") ?? "").toLowerCase();
  const match = [...$("sampler").options].find((o) => o.value && o.value.toLowerCase() === sampler);
  $("sampler").value = match ? match.value : "";
  const width = get("width", "Size-1");
  const height = get("height", "Size-2");
  if (sizes && width && height) setSize(Number(width), Number(height));
}

async function readParameters(file) {
  clearMessages();
  const image = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  let info;
  try {
    info = await api("/png-info", { method: "POST", body: { image } });
  } catch (error) {
    handleError(error);
    return;
  }
  const params = info.parameters_json || (info.info ? info.parameters : null);
  if (!params) {
    showError(`${file.name} carries no generation parameters.`);
    return;
  }
  applyParameters(params);
  showNotice(`Settings read from ${file.name}.`);
}

function wireDrop() {
  const overlay = $("drop-overlay");
  const carriesFiles = (event) => [...(event.dataTransfer?.types ?? [])].includes("Files");
  window.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    const onSource = Boolean(event.target.closest?.("#source"));
    overlay.hidden = onSource;
    $("dropzone").classList.toggle("over", onSource);
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) overlay.hidden = true;
  });
  window.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    overlay.hidden = true;
    $("dropzone").classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (!file) return;
    // Onto the image area: the image to work on. Anywhere else: read its parameters into the form.
    if (event.target.closest?.("#source")) loadSource(file);
    else readParameters(file);
  });
}

// -- generating ----------------------------------------------------------------------------------
function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function requestBody() {
  const mode = currentMode();
  const steps = numberField("steps");
  const body = {
    task: mode,
    model: $("model").value || undefined,
    prompt: $("prompt").value,
    negative_prompt: $("negative").value || undefined,
    steps,
    guidance_scale: numberField("guidance"),
    num_images: numberField("count"),
    sampler: $("sampler").value || undefined,
    loras: [...state.loras].map(([name, weight]) => ({ name, weight })),
    preview_every: Math.max(1, Math.round((Number(steps) || 20) / 10)),
  };
  const seed = numberField("seed");
  if (seed !== undefined && seed !== -1) body.seed = seed;
  if (mode === "txt2img") {
    Object.assign(body, { width: numberField("width"), height: numberField("height") });
    if ($("hires-on").checked) {
      body.hires = {
        scale: numberField("hires-scale"),
        upscaler: $("hires-upscaler").value || "Latent",
        strength: numberField("hires-strength"),
      };
    }
    return body;
  }
  if (!editor.loaded) throw new Error("init_image: choose, paste or drop an image to work on first.");
  Object.assign(body, { init_image: editor.imageDataURL(), strength: numberField("strength") });
  if (mode === "inpaint") {
    if (!editor.hasMask()) throw new Error("mask_image: paint over the part of the image to repaint first.");
    body.mask_image = editor.maskDataURL();
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  clearMessages();
  let body;
  try {
    body = requestBody();
  } catch (error) {
    showError(error.message);
    return;
  }
  let created;
  try {
    created = await api("/v1/jobs", { method: "POST", body });
  } catch (error) {
    handleError(error);
    return;
  }
  followJob(trackJob(created.id, body.prompt));
}

function trackJob(id, prompt) {
  const li = document.createElement("li");
  const what = Object.assign(document.createElement("span"), { className: "what", textContent: prompt, title: prompt });
  const status = Object.assign(document.createElement("span"), { className: "status", textContent: "queued" });
  const stop = Object.assign(document.createElement("button"), { type: "button", textContent: "Stop" });
  stop.setAttribute("aria-label", `Cancel job: ${prompt}`);
  li.append(what, status, stop);
  $("jobs").prepend(li);
  while ($("jobs").children.length > 12) $("jobs").lastElementChild.remove();
  const job = { id, prompt, li, status, stop, controller: new AbortController() };
  stop.addEventListener("click", () => cancelJob(job));
  state.jobs.set(id, job);
  state.current = job;
  $("progress-area").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = "Queued";
  $("preview").hidden = true;
  updateRunning();
  return job;
}

async function followJob(job) {
  try {
    for await (const { event, data } of events(`/v1/jobs/${job.id}/events`, job.controller.signal)) {
      if (event === "status" || event === "progress") onProgress(job, data);
      else return finish(job, event, data);
    }
  } catch (error) {
    if (error.name === "AbortError") return;
  }
  // The stream broke off before the end: ask for the outcome until there is one.
  for (;;) {
    try {
      const data = await api(`/v1/jobs/${job.id}`);
      if (!["queued", "running"].includes(data.status)) return finish(job, data.status, data);
      onProgress(job, data);
    } catch (error) {
      return finish(job, "failed", { error: { message: error.message } });
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function onProgress(job, data) {
  const progress = data.progress;
  const queued = data.status === "queued";
  job.status.textContent = queued ? `queued #${(data.queue_position ?? 0) + 1}` : `${progress?.percent ?? 0}%`;
  if (job !== state.current) return;
  if (queued) {
    $("progress-text").textContent = `Waiting in the queue (position ${(data.queue_position ?? 0) + 1})`;
  } else if (progress) {
    $("progress").value = progress.percent;
    const eta = progress.eta_s == null ? "" : ` · about ${Math.ceil(progress.eta_s)} s left`;
    $("progress-text").textContent = `Step ${progress.step} of ${progress.total}${eta}`;
  }
  if (data.preview) {
    $("preview").src = `data:image/png;base64,${data.preview}`;
    $("preview").hidden = false;
  }
}

function finish(job, outcome, data) {
  state.jobs.delete(job.id);
  job.status.textContent = outcome;
  job.stop.hidden = true;
  if (outcome === "succeeded") {
    showResults(job, data.images ?? []);
    showNotice((data.warnings ?? []).join("\n"));
    refreshGallery();
  } else if (outcome === "cancelled") {
    showNotice("Cancelled.");
  } else {
    showError(data.error?.message || `The job ${outcome}.`);
  }
  if (job === state.current) {
    state.current = [...state.jobs.values()].at(-1) ?? null;
    $("progress-area").hidden = state.current === null;
  }
  updateRunning();
}

function showResults(job, images) {
  const figures = images.map((image) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${image.base64}`;
    img.alt = `${job.prompt} (seed ${image.seed})`;
    const caption = document.createElement("figcaption");
    caption.textContent = `seed ${image.seed}${image.nsfw ? " · blacked out by the safety checker" : ""}`;
    figure.append(img, caption);
    return figure;
  });
  $("results").replaceChildren(...figures);
  if (images.length) {
    state.lastSeed = images[0].seed;
    $("seed-reuse").disabled = false;
  }
}

async function cancelJob(job) {
  try {
    await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
  } catch (error) {
    handleError(error);
  }
}

function updateRunning() {
  $("cancel").hidden = state.current === null;
  if (state.jobs.size && state.queueTimer === null) {
    state.queueTimer = setInterval(refreshQueue, 2000);
  } else if (!state.jobs.size && state.queueTimer !== null) {
    clearInterval(state.queueTimer);
    state.queueTimer = null;
  }
  refreshQueue();
}

async function refreshQueue() {
  try {
    const queue = await api("/v1/queue");
    const busy = queue.queued + queue.running;
    $("queue").textContent = busy ? `Queue: ${queue.running} running · ${queue.queued} waiting` : "Queue: idle";
  } catch {
    // the queue line is a nicety; errors show where the user acted
  }
}

// -- history gallery -----------------------------------------------------------------------------
async function refreshGallery({ append = false } = {}) {
  const generation = ++state.gallery.generation;
  const offset = append ? state.gallery.offset : 0;
  const query = new URLSearchParams({ limit: PAGE_SIZE, offset });
  if ($("search").value.trim()) query.set("prompt", $("search").value.trim());
  if ($("filter-model").value) query.set("model", $("filter-model").value);
  let page;
  try {
    page = await api(`/v1/history?${query}`);
  } catch (error) {
    $("gallery-note").textContent = error.message;
    return;
  }
  const owned = [];
  const items = await Promise.all(page.items.map((item) => galleryItem(item, owned)));
  if (generation !== state.gallery.generation) return release(owned); // a newer refresh won
  if (!append) release(state.gallery.owned);
  state.gallery.owned.push(...owned);
  if (append) $("gallery").append(...items);
  else $("gallery").replaceChildren(...items);
  state.gallery.offset = offset + page.items.length;
  $("more").hidden = state.gallery.offset >= page.total;
  $("gallery-note").textContent = !page.enabled
    ? "This server keeps no history (--history off)."
    : page.total === 0
      ? "Nothing kept yet: what you generate appears here."
      : `${page.total} image${page.total === 1 ? "" : "s"}`;
}

async function galleryItem(item, owned) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.title = item.prompt;
  const img = document.createElement("img");
  img.alt = `${item.prompt} (seed ${item.seed})`;
  img.loading = "lazy";
  img.decoding = "async";
  try {
    img.src = await imageSource(`${item.image_url}?size=256`, owned);
  } catch {
    img.alt += " (the image cannot be loaded)";
  }
  button.append(img);
  button.addEventListener("click", () => openDetail(item));
  li.append(button);
  return li;
}

function addParam(list, name, value) {
  if (value === undefined || value === null || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

async function openDetail(item) {
  state.detail = item;
  release(state.detailOwned);
  const p = item.parameters ?? {};
  const list = $("detail-params");
  list.replaceChildren();
  const rows = [
    ["Prompt", p.prompt ?? item.prompt], ["Negative prompt", p.negative_prompt], ["Model", item.model],
    ["Task", item.task], ["Size", `${item.width} × ${item.height}`], ["Steps", p.steps], ["Sampler", p.sampler],
    ["Guidance", p.cfg_scale], ["Seed", item.seed], ["Strength", p.denoising_strength], ["Clip skip", p.clip_skip],
    ["Made", new Date(item.created_at * 1000).toLocaleString()],
  ];
  for (const [name, value] of rows) addParam(list, name, value);
  $("detail-title").textContent = item.nsfw ? "Image (blacked out by the safety checker)" : "Image";
  const src = await imageSource(item.image_url, state.detailOwned).catch(() => "");
  $("detail-image").src = src;
  $("detail-image").alt = `${item.prompt} (seed ${item.seed})`;
  $("download").href = src;
  $("download").download = `sdserver-${item.seed}-${item.id.slice(0, 8)}.png`;
  if (!$("detail").open) $("detail").showModal();
}

async function sendTo(mode) {
  const item = state.detail;
  $("detail").close();
  try {
    const response = await api(item.image_url, { raw: true });
    applyParameters(item.parameters ?? {}, { sizes: false });
    await loadSource(await response.blob(), { mode });
  } catch (error) {
    handleError(error);
  }
}

async function deleteItem() {
  const item = state.detail;
  try {
    await api(`/v1/history/${item.id}`, { method: "DELETE" });
  } catch (error) {
    handleError(error);
    return;
  }
  $("detail").close();
  showNotice("Deleted.");
  refreshGallery();
}

function wireGallery() {
  let typing;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => refreshGallery(), 250);
  });
  $("filter-model").addEventListener("change", () => refreshGallery());
  $("more").addEventListener("click", () => refreshGallery({ append: true }));
  $("reuse").addEventListener("click", () => {
    applyParameters(state.detail.parameters ?? {});
    $("detail").close();
    showNotice("Settings of that image are in the form.");
  });
  $("to-img2img").addEventListener("click", () => sendTo("img2img"));
  $("to-inpaint").addEventListener("click", () => sendTo("inpaint"));
  $("delete").addEventListener("click", deleteItem);
  $("detail-close").addEventListener("click", () => $("detail").close());
}

// -- the form ------------------------------------------------------------------------------------
function wireForm() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => state.current && cancelJob(state.current));
  $("model").addEventListener("change", () => onModelChange());
  $("preset").addEventListener("change", () => {
    if (!$("preset").value) return;
    const [width, height] = $("preset").value.split("x").map(Number);
    setSize(width, height);
  });
  $("width").addEventListener("input", onSizeInput);
  $("height").addEventListener("input", onSizeInput);
  $("seed-random").addEventListener("click", () => ($("seed").value = -1));
  $("seed-reuse").addEventListener("click", () => state.lastSeed !== null && ($("seed").value = state.lastSeed));
  $("lora-add").addEventListener("change", () => {
    const name = $("lora-add").value;
    if (name && !state.loras.has(name)) state.loras.set(name, 1);
    $("lora-add").value = "";
    renderLoras();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
}

wireSource();
wireForm();
wireGallery();
wireDrop();
wireKeyDialog();
setMode(currentMode());
connect();
