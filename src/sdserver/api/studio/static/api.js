// Talking to the server: every call sends the API key (when one is stored) and turns an error
// response into an ApiError carrying the API's own message.

const KEY_STORAGE = "sdserver.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The message of an error response, whichever of the server's shapes it has.
async function messageOf(response) {
  const text = await response.text();
  try {
    const data = JSON.parse(text);
    const detail = Array.isArray(data.detail) ? data.detail[0]?.msg : data.detail;
    return data.error?.message || data.message || detail || text;
  } catch {
    return text || `HTTP ${response.status} ${response.statusText}`;
  }
}

// fetch() with the key; JSON in and out. `raw: true` returns the Response itself.
export async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  const init = { method, signal, headers: headers() };
  if (body !== undefined) {
    init.headers = headers({ "Content-Type": "application/json" });
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`The server cannot be reached (${error.message}).`, 0);
  }
  if (!response.ok) throw new ApiError(await messageOf(response), response.status);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// Server-Sent Events read through fetch (EventSource cannot send the key): yields {event, data}.
export async function* events(path, signal) {
  const response = await api(path, { raw: true, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// A URL an <img> can show: the path itself, or (when a key must go along) an object URL of the
// image fetched with it. Object URLs are collected in `owned` so their memory can be released.
export async function imageSource(path, owned) {
  if (!apiKey()) return path;
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  owned?.push(url);
  return url;
}

export function release(owned) {
  for (const url of owned.splice(0)) URL.revokeObjectURL(url);
}
