// The console's shell: tabs (the URL's #hash), the model list they share, the API-key form.
import { html, render, useEffect, useState } from "./vendor/htm-preact.js";
import { getJSON, onKeyNeeded, setKey } from "./api.js";
import { Chat } from "./chat.js";
import { Library } from "./library.js";
import { Metrics, startMetrics } from "./metrics.js";
import { Running } from "./running.js";

const TABS = [
  ["chat", "Chat"],
  ["library", "Library"],
  ["running", "Running"],
  ["metrics", "Metrics"],
];

function currentTab() {
  const hash = location.hash.slice(1);
  return TABS.some(([id]) => id === hash) ? hash : "chat";
}

function App() {
  const [tab, setTab] = useState(currentTab);
  const [models, setModels] = useState([]);
  const [error, setError] = useState("");
  const [asking, setAsking] = useState(null); // the resolve of a pending key request
  const refresh = () => getJSON("api/tags").then((t) => (setModels(t.models || []), setError(""))).catch((e) => setError(e.message));
  useEffect(() => {
    onKeyNeeded(() => new Promise((resolve) => setAsking(() => resolve)));
    const onHash = () => setTab(currentTab());
    window.addEventListener("hashchange", onHash);
    refresh().then(startMetrics);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);
  return html`
    <header>
      <h1>ortserve</h1>
      <nav aria-label="Console sections">
        ${TABS.map(([id, label]) => html`<a key=${id} href=${`#${id}`}
            aria-current=${tab === id ? "page" : undefined}>${label}</a>`)}
        <a href="docs">API</a>
      </nav>
    </header>
    <main id=${tab}>
      ${asking && html`<${KeyForm} onKey=${(key) => (setAsking(null), asking(key))} />`}
      ${error && html`<p class="error" role="alert">${error}</p>`}
      ${tab === "chat" && html`<${Chat} models=${models} />`}
      ${tab === "library" && html`<${Library} models=${models} onChange=${refresh} />`}
      ${tab === "running" && html`<${Running} />`}
      ${tab === "metrics" && html`<${Metrics} />`}
    </main>`;
}

// Asked for when the server answers 401 (ORTSERVE_API_KEYS): kept in sessionStorage only.
function KeyForm({ onKey }) {
  const [key, setKeyText] = useState("");
  function submit(event) {
    event.preventDefault();
    setKey(key);
    onKey(key);
  }
  return html`<form class="key" onSubmit=${submit}>
    <p>This server needs an API key. It is kept in this tab only (sessionStorage).</p>
    <label>API key <input type="password" name="api-key" autocomplete="off" required autofocus
      value=${key} onInput=${(e) => setKeyText(e.target.value)} /></label>
    <button type="submit">Use key</button>
  </form>`;
}

render(html`<${App} />`, document.getElementById("app"));
