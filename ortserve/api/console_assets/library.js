// Library: the models on disk, pull with progress, copy, delete, the Modelfile.
import { html, useEffect, useState } from "./vendor/htm-preact.js";
import { bytes, postJSON, request, stream } from "./api.js";

const CAPABILITIES = ["completion", "tools", "thinking", "embedding", "vision"];

export function Library({ models, onChange }) {
  const [providers, setProviders] = useState({});
  useEffect(() => {
    for (const m of models) {
      postJSON("api/show", { model: m.name })
        .then((show) => setProviders((p) => ({ ...p, [m.name]: show.provider })))
        .catch(() => {});
    }
  }, [models]);
  return html`
    <div class="library">
      <${Pull} onDone=${onChange} />
      <table class="models">
        <caption>Models in the library</caption>
        <thead><tr><th scope="col">Name</th><th scope="col">Size</th><th scope="col">Family</th>
          <th scope="col">Quantization</th><th scope="col">Capabilities</th>
          <th scope="col">Provider</th><th scope="col">Actions</th></tr></thead>
        <tbody>
          ${models.map((m) => html`<${ModelRow} key=${m.name} model=${m}
              provider=${providers[m.name]} onChange=${onChange} />`)}
        </tbody>
      </table>
      ${models.length === 0 && html`<p>No models yet: pull one above.</p>`}
    </div>`;
}

function ModelRow({ model, provider, onChange }) {
  const [action, setAction] = useState(null); // null | "copy" | "delete" | "modelfile"
  const d = model.details || {};
  const caps = (model.capabilities || []).filter((c) => CAPABILITIES.includes(c));
  return html`
    <tr data-model=${model.name}>
      <th scope="row">${model.name}</th>
      <td data-label="Size">${bytes(model.size)}</td>
      <td data-label="Family">${d.family || "—"}</td>
      <td data-label="Quantization">${d.quantization_level || "—"}</td>
      <td data-label="Capabilities">${caps.map((c) => html`<span class="badge" key=${c}>${c}</span>`)}</td>
      <td data-label="Provider">${provider || "…"}</td>
      <td class="actions">
        <button type="button" onClick=${() => setAction(action === "modelfile" ? null : "modelfile")}>Modelfile</button>
        <button type="button" onClick=${() => setAction("copy")}>Copy</button>
        <button type="button" class="danger" onClick=${() => setAction("delete")}>Delete</button>
      </td>
    </tr>
    ${action && html`<tr class="detail"><td colspan="7">
      ${action === "modelfile" && html`<${Modelfile} name=${model.name} />`}
      ${action === "copy" && html`<${CopyForm} name=${model.name} onDone=${() => (setAction(null), onChange())} onCancel=${() => setAction(null)} />`}
      ${action === "delete" && html`<${DeleteConfirm} name=${model.name} onDone=${() => (setAction(null), onChange())} onCancel=${() => setAction(null)} />`}
    </td></tr>`}`;
}

function Modelfile({ name }) {
  const [text, setText] = useState("loading…");
  useEffect(() => {
    postJSON("api/show", { model: name }).then((s) => setText(s.modelfile || "")).catch((e) => setText(e.message));
  }, [name]);
  return html`<pre class="modelfile" aria-label=${`Modelfile of ${name}`}><code>${text}</code></pre>`;
}

function CopyForm({ name, onDone, onCancel }) {
  const [target, setTarget] = useState(`${name.split(":")[0]}-copy`);
  const [error, setError] = useState("");
  async function submit(event) {
    event.preventDefault();
    try {
      await postJSON("api/copy", { source: name, destination: target });
      onDone();
    } catch (e) {
      setError(e.message);
    }
  }
  return html`<form class="inline" onSubmit=${submit}>
    <label>Copy ${name} to <input value=${target} onInput=${(e) => setTarget(e.target.value)} required /></label>
    <button type="submit">Copy</button> <button type="button" class="secondary" onClick=${onCancel}>Cancel</button>
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </form>`;
}

function DeleteConfirm({ name, onDone, onCancel }) {
  const [error, setError] = useState("");
  async function remove() {
    try {
      await request("api/delete", { method: "DELETE", body: { model: name } });
      onDone();
    } catch (e) {
      setError(e.message);
    }
  }
  return html`<div class="inline" role="group" aria-label="Confirm deletion">
    <span>Delete ${name} from the library? This cannot be undone.</span>
    <button type="button" class="danger" onClick=${remove}>Yes, delete ${name}</button>
    <button type="button" class="secondary" onClick=${onCancel}>Cancel</button>
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </div>`;
}

// Pull by name or hf.co/org/repo: /api/pull's NDJSON progress as a bar.
function Pull({ onDone }) {
  const [name, setName] = useState("");
  const [status, setStatus] = useState(null); // {status, completed, total} | null
  const [error, setError] = useState("");
  async function submit(event) {
    event.preventDefault();
    setError("");
    setStatus({ status: "starting" });
    try {
      await stream("api/pull", { model: name.trim(), stream: true }, (line) => {
        if (line.error) throw new Error(line.error);
        setStatus((s) => ({ ...s, ...line, percent: percent(line, s) }));
      });
      onDone();
    } catch (e) {
      setError(e.message);
      setStatus(null);
    }
  }
  return html`<form class="pull" onSubmit=${submit}>
    <label>Pull a model (name or hf.co/org/repo)
      <input name="pull" value=${name} onInput=${(e) => setName(e.target.value)} required
        placeholder="hf.co/onnx-community/Qwen2.5-0.5B-Instruct" /></label>
    <button type="submit" disabled=${status && status.status !== "success"}>Pull</button>
    ${status && html`<div class="progress">
      <progress max="100" value=${status.percent ?? 0} aria-label="Pull progress"></progress>
      <span class="pull-status" aria-live="polite">${status.status} ${status.percent ?? 0}%</span></div>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </form>`;
}

// A file's own progress while downloading; 100 once the pull reports success.
function percent(line, previous) {
  if (line.status === "success") return 100;
  if (line.total) return Math.floor((100 * (line.completed || 0)) / line.total);
  return previous?.percent ?? 0;
}
