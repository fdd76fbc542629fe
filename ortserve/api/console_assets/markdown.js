// Markdown to safe HTML: marked parses, DOMPurify removes anything that could run.
import { marked } from "./vendor/marked.js";
import DOMPurify from "./vendor/purify.js";

marked.setOptions({ gfm: true, breaks: true });

export function markdown(text) {
  return DOMPurify.sanitize(marked.parse(text || ""), { USE_PROFILES: { html: true } });
}
