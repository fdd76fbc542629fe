// Chat: a model picker, streamed answers (thinking folded apart, tool calls as cards),
// JSON-schema output, stop, edit and resend, sampling options from the model's parameters.
import { html, useEffect, useRef, useState } from "./vendor/htm-preact.js";
import { can, postJSON, stream } from "./api.js";
import { markdown } from "./markdown.js";
import { loadConversations, newConversation, parseParameters, saveConversations } from "./store.js";
import { runTool, WEATHER_TOOL } from "./tools.js";

const MAX_TOOL_ROUNDS = 3;
const SAMPLING = ["temperature", "top_p", "top_k", "num_predict", "num_ctx", "seed"];

// The fields a message has on the wire (the page keeps errors and more beside them).
function wire(message) {
  const out = { role: message.role, content: message.content || "" };
  if (message.tool_calls?.length) out.tool_calls = message.tool_calls;
  if (message.tool_name) out.tool_name = message.tool_name;
  if (message.images?.length) out.images = message.images;
  return out;
}

function guided(settings) {
  return settings.tools || settings.json;
}

function requestBody(conversation, settings) {
  const body = { model: conversation.model, messages: conversation.messages.map(wire), stream: true };
  // A grammar (tools, JSON) leaves no room for a thinking section: the server refuses both.
  if (settings.thinkable && !guided(settings)) body.think = settings.think;
  if (settings.tools) body.tools = [WEATHER_TOOL];
  if (settings.json) body.format = settings.schema.trim() ? JSON.parse(settings.schema) : "json";
  const options = {};
  for (const [name, value] of Object.entries(settings.options)) {
    if (value !== "" && value !== undefined) options[name] = Number.isNaN(Number(value)) ? value : Number(value);
  }
  if (Object.keys(options).length) body.options = options;
  return body;
}

// Folds one NDJSON line of /api/chat into the assistant message being written.
function absorb(message, line) {
  if (line.error) return { ...message, error: line.error };
  const part = line.message || {};
  return {
    ...message,
    content: message.content + (part.content || ""),
    thinking: (message.thinking || "") + (part.thinking || ""),
    tool_calls: [...(message.tool_calls || []), ...(part.tool_calls || [])],
    done: Boolean(line.done),
  };
}

// Reads an image file as Ollama's base64 (no data: prefix). Used only for vision models.
function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Shows base64 kept without its type: browsers sniff an image's real format (PNG, JPEG, GIF,
// WebP) whatever image/ type the URL names. data: images are allowed by the page's CSP.
function imageURL(base64) {
  return `data:image/png;base64,${base64}`;
}

function Thumbnails({ images, label, onRemove }) {
  return html`<ul class="thumbnails" aria-label=${label}>
    ${images.map((image, i) => html`<li key=${i}><img src=${imageURL(image)} alt=${`Image ${i + 1}`} />
      ${onRemove && html`<button type="button" class="icon" aria-label=${`Remove image ${i + 1}`}
        onClick=${() => onRemove(i)}>×</button>`}</li>`)}
  </ul>`;
}

export function Chat({ models }) {
  const chatModels = models.filter((m) => !can(m, "embedding") || can(m, "completion"));
  const [conversations, setConversations] = useState(loadConversations);
  const [currentId, setCurrentId] = useState(conversations[0]?.id);
  const [busy, setBusy] = useState(false);
  const abort = useRef(null);
  const current = conversations.find((c) => c.id === currentId);
  const modelName = current?.model || chatModels[0]?.name || "";
  const model = models.find((m) => m.name === modelName);
  const settings = useSettings(model);

  // The list as last written: updates made while a stream runs build on it synchronously.
  const latest = useRef(conversations);
  const currentIdRef = useRef(currentId);

  function store(next) {
    latest.current = next;
    setConversations(next);
    saveConversations(next);
  }

  function select(id) {
    currentIdRef.current = id;
    setCurrentId(id);
  }

  // Replaces the current conversation (creating it on first use) with change(conversation).
  function update(change) {
    const list = latest.current;
    const base = list.find((c) => c.id === currentIdRef.current) || newConversation(modelName);
    const changed = change(base);
    store([changed, ...list.filter((c) => c.id !== base.id)]);
    if (currentIdRef.current !== base.id) select(base.id);
    return changed;
  }

  async function send(text, images = [], history = null) {
    const title = text.slice(0, 40) || "Image";
    update((c) => {
      const kept = history === null ? c.messages : c.messages.slice(0, history);
      const first = kept.length === 0;
      return { ...c, model: modelName, title: first ? title : c.title,
               messages: [...kept, { role: "user", content: text, images }] };
    });
    setBusy(true);
    abort.current = new AbortController();
    try {
      for (let round = 0; round < MAX_TOOL_ROUNDS; round++) {
        const calls = await answer(abort.current.signal);
        if (!calls.length || !settings.tools) break;
        update((c) => ({ ...c, messages: [...c.messages, ...calls.map(toolResult)] }));
      }
    } finally {
      setBusy(false);
      abort.current = null;
    }
  }

  function toolResult(call) {
    return { role: "tool", tool_name: call.function?.name, content: runTool(call) };
  }

  // Streams one assistant message; returns the tool calls it made.
  async function answer(signal) {
    const conversation = update((c) => c);
    let message = { role: "assistant", content: "", thinking: "", json: settings.json };
    update((c) => ({ ...c, messages: [...c.messages, message] }));
    const replaceLast = (m) => update((c) => ({ ...c, messages: [...c.messages.slice(0, -1), m] }));
    try {
      const body = requestBody(conversation, settings);
      await stream("api/chat", body, (line) => replaceLast((message = absorb(message, line))), signal);
    } catch (error) {
      message = { ...message, error: error.name === "AbortError" ? "stopped" : error.message };
      replaceLast(message);
    }
    return message.error ? [] : message.tool_calls || [];
  }

  function startNew() {
    const fresh = newConversation(modelName);
    store([fresh, ...latest.current]);
    select(fresh.id);
  }

  function remove(id) {
    store(latest.current.filter((c) => c.id !== id));
    if (id === currentIdRef.current) select(undefined);
  }

  function pickModel(name) {
    if (current) store(latest.current.map((c) => (c.id === current.id ? { ...c, model: name } : c)));
    else startWith(name);
  }

  function startWith(name) {
    const fresh = newConversation(name);
    store([fresh, ...latest.current]);
    select(fresh.id);
  }

  return html`
    <div class="chat">
      <aside class="conversations" aria-label="Conversations">
        <button type="button" onClick=${startNew}>New chat</button>
        <ul>
          ${conversations.map((c) => html`
            <li key=${c.id} class=${c.id === currentId ? "current" : ""}>
              <button type="button" class="link" onClick=${() => select(c.id)}
                aria-current=${c.id === currentId ? "true" : undefined}>${c.title}</button>
              <button type="button" class="icon" aria-label=${`Delete conversation ${c.title}`}
                onClick=${() => remove(c.id)}>×</button>
            </li>`)}
        </ul>
      </aside>
      <section class="conversation" aria-label="Conversation">
        <${Controls} models=${chatModels} model=${model} modelName=${modelName}
          onModel=${pickModel} settings=${settings} />
        <${Messages} messages=${current?.messages || []} busy=${busy}
          onResend=${(i, text) => send(text, current.messages[i].images || [], i)} />
        <${Composer} busy=${busy} vision=${can(model, "vision")} disabled=${!modelName}
          onSend=${send} onStop=${() => abort.current?.abort()} />
      </section>
    </div>`;
}

// Think, tools, JSON mode and sampling options; the options start from /api/show's parameters.
function useSettings(model) {
  const [think, setThink] = useState(true);
  const [tools, setTools] = useState(false);
  const [json, setJson] = useState(false);
  const [schema, setSchema] = useState("");
  const [defaults, setDefaults] = useState({});
  const [options, setOptions] = useState({});
  useEffect(() => {
    setOptions({});
    setDefaults({});
    if (!model) return;
    postJSON("api/show", { model: model.name })
      .then((show) => setDefaults(parseParameters(show.parameters)))
      .catch(() => setDefaults({}));
  }, [model?.name]);
  const thinkable = can(model, "thinking");
  return { think, setThink, tools, setTools, json, setJson, schema, setSchema, defaults,
           options, setOptions, thinkable };
}

function Controls({ models, model, modelName, onModel, settings: s }) {
  return html`
    <div class="controls">
      <label>Model
        <select value=${modelName} onChange=${(e) => onModel(e.target.value)} name="model">
          ${models.map((m) => html`<option key=${m.name} value=${m.name}>${m.name}</option>`)}
        </select>
      </label>
      ${s.thinkable && html`<label class="check"><input type="checkbox" checked=${s.think && !guided(s)}
          disabled=${guided(s)} title=${guided(s) ? "not with tools or JSON output" : undefined}
          onChange=${(e) => s.setThink(e.target.checked)} /> Think</label>`}
      ${can(model, "tools") && html`<label class="check"><input type="checkbox" checked=${s.tools}
          name="tools" onChange=${(e) => s.setTools(e.target.checked)} /> Tool demo (get_weather)</label>`}
      <label class="check"><input type="checkbox" checked=${s.json} name="json"
        onChange=${(e) => s.setJson(e.target.checked)} /> JSON output</label>
      ${s.json && html`<label class="wide">JSON schema (empty: any JSON)
        <textarea rows="3" name="schema" value=${s.schema} onInput=${(e) => s.setSchema(e.target.value)}
          placeholder='{"type": "object", "properties": {"answer": {"type": "string"}}}'></textarea>
      </label>`}
      <details class="wide options">
        <summary>Sampling options</summary>
        <div class="grid">
          ${[...new Set([...SAMPLING, ...Object.keys(s.defaults).filter((k) => k !== "stop")])].map(
            (name) => html`<label key=${name}>${name}
              <input inputmode="decimal" name=${name} value=${s.options[name] ?? ""}
                placeholder=${s.defaults[name] ?? "default"}
                onInput=${(e) => s.setOptions({ ...s.options, [name]: e.target.value })} /></label>`,
          )}
        </div>
      </details>
    </div>`;
}

function Messages({ messages, busy, onResend }) {
  const end = useRef(null);
  useEffect(() => end.current?.scrollIntoView?.({ block: "end" }), [messages]);
  return html`
    <ol class="messages" aria-live="polite" aria-busy=${busy ? "true" : "false"}>
      ${messages.map((m, i) => html`<${Message} key=${i} message=${m} busy=${busy}
          onResend=${(text) => onResend(i, text)} />`)}
      <li ref=${end} class="end" aria-hidden="true"></li>
    </ol>`;
}

function Message({ message, busy, onResend }) {
  const [editing, setEditing] = useState(false);
  const [draft, setDraft] = useState(message.content);
  if (message.role === "tool") {
    return html`<li class="card tool-result"><strong>Tool result</strong> (${message.tool_name})
      <pre><code>${message.content}</code></pre></li>`;
  }
  if (message.role === "user" && editing) {
    return html`<li class="user editing">
      <label>Edit message<textarea rows="3" value=${draft} onInput=${(e) => setDraft(e.target.value)} /></label>
      <button type="button" onClick=${() => (setEditing(false), onResend(draft))}>Resend</button>
      <button type="button" class="secondary" onClick=${() => setEditing(false)}>Cancel</button>
    </li>`;
  }
  return html`<li class=${message.role}>
    <span class="role">${message.role === "user" ? "You" : "Assistant"}</span>
    ${message.thinking && html`<details class="thinking"><summary>Thinking</summary>
      <div class="thought">${message.thinking}</div></details>`}
    ${message.images?.length > 0 && html`<${Thumbnails} images=${message.images} label="Images" />`}
    ${message.content && (message.json // shown as written: as Markdown, "*a*" would lose its stars
      ? html`<pre class="json"><code>${message.content}</code></pre>`
      : html`<div class="markdown" dangerouslySetInnerHTML=${{ __html: markdown(message.content) }}></div>`)}
    ${(message.tool_calls || []).map((call, i) => html`<div class="card tool-call" key=${i}>
      <strong>Tool call</strong> ${call.function?.name}
      <pre><code>${JSON.stringify(call.function?.arguments ?? {}, null, 2)}</code></pre></div>`)}
    ${message.error && html`<p class="error" role="alert">${message.error}</p>`}
    ${message.role === "user" && !busy && html`<button type="button" class="link"
      onClick=${() => (setDraft(message.content), setEditing(true))}>Edit</button>`}
  </li>`;
}

function Composer({ busy, vision, disabled, onSend, onStop }) {
  const [text, setText] = useState("");
  const [images, setImages] = useState([]);
  const picker = useRef(null);
  const attached = vision ? images : []; // a model without vision is sent none
  function submit(event) {
    event.preventDefault();
    if (busy || disabled || (!text.trim() && !attached.length)) return;
    onSend(text.trim(), attached);
    setText("");
    setImages([]);
  }
  // For vision models: images dropped on the composer or picked with "Attach image" (the
  // keyboard's way) go with the next message.
  async function attach(files) {
    const read = await Promise.all([...files].filter((f) => f.type.startsWith("image/")).map(readImage));
    setImages((old) => [...old, ...read]);
  }
  function drop(event) {
    if (!vision) return;
    event.preventDefault();
    attach(event.dataTransfer.files);
  }
  function picked(event) {
    attach([...event.target.files]);
    event.target.value = ""; // so that picking the same file again is a change too
  }
  return html`
    <form class="composer" onSubmit=${submit} onDragOver=${(e) => vision && e.preventDefault()} onDrop=${drop}>
      ${attached.length > 0 && html`<${Thumbnails} images=${attached} label="Attached images"
        onRemove=${(i) => setImages(images.filter((_, j) => j !== i))} />`}
      <label class="visually-hidden" for="prompt">Message</label>
      <textarea id="prompt" rows="2" value=${text} placeholder=${vision ? "Message (drop images here)" : "Message"}
        onInput=${(e) => setText(e.target.value)}
        onKeyDown=${(e) => e.key === "Enter" && !e.shiftKey && submit(e)}></textarea>
      ${vision && html`<button type="button" class="secondary" onClick=${() => picker.current.click()}>Attach image</button>
        <input ref=${picker} type="file" name="images" accept="image/*" multiple hidden onChange=${picked} />`}
      ${busy
        ? html`<button type="button" class="stop" onClick=${onStop}>Stop</button>`
        : html`<button type="submit" disabled=${disabled}>Send</button>`}
    </form>`;
}
