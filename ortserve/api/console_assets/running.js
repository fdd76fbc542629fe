// Running: /api/ps polled live; unload is Ollama's POST /api/generate with keep_alive 0.
import { html, useEffect, useState } from "./vendor/htm-preact.js";
import { bytes, getJSON, postJSON } from "./api.js";

const POLL_MS = 2000;

export function Running() {
  const [models, setModels] = useState([]);
  const [error, setError] = useState("");
  const refresh = () => getJSON("api/ps").then((ps) => (setModels(ps.models || []), setError(""))).catch((e) => setError(e.message));
  useEffect(() => {
    refresh();
    const timer = setInterval(refresh, POLL_MS);
    return () => clearInterval(timer);
  }, []);
  async function unload(name) {
    try {
      await postJSON("api/generate", { model: name, keep_alive: 0 });
    } catch (e) {
      setError(e.message);
    }
    refresh();
  }
  return html`<div class="running">
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <table class="models">
      <caption>Models in memory</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">Provider</th><th scope="col">Memory</th>
        <th scope="col">Context</th><th scope="col">Expires</th><th scope="col">Pending</th><th scope="col">Actions</th></tr></thead>
      <tbody>${models.map((m) => html`<tr key=${m.name} data-model=${m.name}>
        <th scope="row">${m.name}</th>
        <td data-label="Provider">${m.provider}</td>
        <td data-label="Memory">${bytes(m.size_vram || m.size)}${m.size_vram ? " (device)" : ""}</td>
        <td data-label="Context">${m.context_length}</td>
        <td data-label="Expires">${expiry(m.expires_at)}</td>
        <td data-label="Pending">${m.pending ?? 0}</td>
        <td class="actions"><button type="button" onClick=${() => unload(m.name)}>Unload</button></td>
      </tr>`)}</tbody>
    </table>
    ${models.length === 0 && html`<p class="empty">No model is loaded.</p>`}
  </div>`;
}

function expiry(stamp) {
  const seconds = Math.round((Date.parse(stamp) - Date.now()) / 1000);
  if (Number.isNaN(seconds)) return "—";
  if (seconds > 10 * 365 * 86400) return "never";
  if (seconds <= 0) return "now";
  return seconds < 120 ? `in ${seconds} s` : `in ${Math.round(seconds / 60)} min`;
}
