// /docs: Swagger UI over this server's /openapi.json, the console's API key on every request.
import { authHeaders, errorText, setKey, url } from "./api.js";

// The document; with keys configured, asks for one first (the form in docs.html).
async function loadDocument() {
  for (;;) {
    const response = await fetch(url("openapi.json"), { headers: authHeaders() });
    if (response.ok) return response.json();
    if (response.status !== 401) throw new Error(await errorText(response));
    setKey(await askKey());
  }
}

function askKey() {
  const form = document.getElementById("key-form");
  form.hidden = false;
  form.elements["api-key"].focus();
  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      form.hidden = true;
      resolve(form.elements["api-key"].value);
    }, { once: true });
  });
}

async function main() {
  const spec = await loadDocument();
  spec.servers = [{ url: url("").replace(/\/$/, "") }]; // "Try it out" calls this server
  window.SwaggerUIBundle({
    spec,
    dom_id: "#swagger",
    deepLinking: true,
    tryItOutEnabled: false,
    requestInterceptor: (req) => {
      Object.assign(req.headers, authHeaders());
      return req;
    },
  });
}

main().catch((error) => {
  document.getElementById("swagger").textContent = `Could not load the API document: ${error.message}`;
});
