// Conversations kept in this browser (localStorage): nothing about them leaves it.

const KEY = "ortserve.conversations";
const LIMIT = 50; // the oldest go first: localStorage holds a few MB at most

export function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

export function saveConversations(list) {
  try {
    localStorage.setItem(KEY, JSON.stringify(list.slice(0, LIMIT)));
  } catch {
    // full or disabled storage: the conversation still works, it is just not kept
  }
}

export function newConversation(model) {
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "New chat", model, messages: [] };
}

// Ollama's `parameters` text ("temperature 0.7\nstop \"<|end|>\"") as {name: value}.
export function parseParameters(text) {
  const out = {};
  for (const line of (text || "").split("\n")) {
    const match = line.trim().match(/^(\S+)\s+(.+)$/);
    if (!match) continue;
    const [, name, raw] = match;
    const value = raw.startsWith('"') ? raw.replace(/^"|"$/g, "") : Number(raw);
    if (name === "stop") out.stop = [...(out.stop || []), String(value)];
    else out[name] = Number.isNaN(value) ? raw : value;
  }
  return out;
}
