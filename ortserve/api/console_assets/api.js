// The console's one door to the server: same-origin fetches, the API key, NDJSON streams.
// Paths are relative to the server's root (the page may be mounted under a prefix).

const ROOT = new URL("../", import.meta.url);
const KEY = "ortserve.key";
let askKey = null; // set by the key form: () => Promise<string>

export function url(path) {
  return new URL(path.replace(/^\//, ""), ROOT).href;
}

export function onKeyNeeded(ask) {
  askKey = ask;
}

// The key lives in sessionStorage only: gone when the tab closes, never in localStorage.
export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function send(path, { method = "GET", body, signal } = {}) {
  const headers = { ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const init = { method, headers, signal, credentials: "same-origin" };
  if (body !== undefined) init.body = JSON.stringify(body);
  return fetch(url(path), init);
}

// Sends once; on 401 asks for a key (the form) and tries again with it.
export async function request(path, options = {}) {
  let response = await send(path, options);
  if (response.status === 401 && askKey) {
    setKey(await askKey());
    response = await send(path, options);
  }
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  return response;
}

export async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return typeof error === "string" ? error : error?.message || text;
  } catch {
    return text || `${response.status} ${response.statusText}`;
  }
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function postJSON(path, body, method = "POST") {
  const response = await request(path, { method, body });
  const text = await response.text();
  return text ? JSON.parse(text) : {};
}

// POSTs `body` and calls onLine(object) for each NDJSON line as it arrives.
export async function stream(path, body, onLine, signal) {
  const response = await request(path, { method: "POST", body, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    const lines = pending.split("\n");
    pending = lines.pop();
    for (const line of lines) if (line.trim()) onLine(JSON.parse(line));
  }
  if (pending.trim()) onLine(JSON.parse(pending));
}

// Ollama's capability list, with the ones the console acts on.
export function can(model, capability) {
  return (model?.capabilities || []).includes(capability);
}

export function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log10(n) / 3));
  return `${(n / 1000 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}
