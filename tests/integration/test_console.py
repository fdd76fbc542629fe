"""The web console (/ui) and the API reference (/docs) in a real browser: Playwright driving
Debian's chromium against a real `ortserve serve` of demo-chat (a trained model: it thinks and
calls tools), a pull from tests/hub.py, and a second server of the tiny random Qwen2.5-VL
(pictures, and answers that run to the context's end, for Stop). Each page is saved as a screenshot under
.cache/console-screenshots/ (CI keeps them); docs/images/ holds copies.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import requests

from converters import convert, vision
from converters.demo import build_demo_models
from ortserve.api.console import CSP
from ortserve.library import Library
from tests.hub import LocalHub
from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")

CHROMIUM = Path("/usr/bin/chromium")  # .ci/run installs Debian's chromium
SHOTS = Path(__file__).resolve().parents[2] / ".cache" / "console-screenshots"
REPO = "test/console-chat"
VARIANT = "cpu-int4-rtn-block-32"
FOREIGN = "evil.test"  # resolved to 127.0.0.1 by the browser only (--host-resolver-rules)
KEY = "sk-console-test-key"
TIMEOUT_MS = 60_000
VISION = "tiny-vl:latest"  # random weights: the answer means nothing, and greedy it runs long


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Library:
    """demo-chat and all-minilm, as `make demo` builds them."""
    library = Library(tmp_path_factory.mktemp("console") / "models")
    build_demo_models(library, progress=False)
    return library


@pytest.fixture(scope="module")
def hub(tmp_path_factory, library):
    """A hub repository holding demo-chat's bundle as a CPU variant (what the UI pulls)."""
    repo = tmp_path_factory.mktemp("console-hub") / "repo"
    shutil.copytree(library.get("demo-chat").path, repo / VARIANT)
    (repo / VARIANT / "ortserve-files.json").unlink()
    running = LocalHub()
    running.add_repo(REPO, repo)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(library, hub, tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf-home")
    running = Server(library, HF_ENDPOINT=hub.url, HF_HOME=str(hf_home),
                     HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vl):
    """A second server: the tiny random Qwen2.5-VL (fp32), kept apart from demo-chat's so that
    the library, running and metrics tests see only theirs."""
    library = Library(tmp_path_factory.mktemp("console-tiny") / "models")
    convert(tiny_vl, VISION.split(":")[0], "fp32", library=library, progress=False)
    running = Server(library)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[bytes, bytes]:
    """Two PNGs drawn with pillow (112x84 and 56x140)."""
    folder = tmp_path_factory.mktemp("pictures")
    return tuple(vision.make_image(folder / f"{w}x{h}.png", (w, h)).read_bytes()
                 for w, h in ((112, 84), (56, 140)))  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium; .ci/run does)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", f"--host-resolver-rules=MAP {FOREIGN} 127.0.0.1"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def foreign_site():
    """Another site's page: http://evil.test:{port}/ in the browser, served from 127.0.0.1."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>elsewhere</title>")

        def log_message(self, *args):
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield site.server_address[1]
    site.shutdown()


@pytest.fixture
def page(browser):
    """A fresh page; it fails its test on any Content-Security-Policy violation or page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text
            else None)  # fmt: skip
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert problems == []


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_console(page, server, tab: str = "chat"):
    page.goto(f"{server.url}/ui#{tab}")
    page.wait_for_selector(f"main#{tab}")


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("form.composer button[type=submit]")


def last_answer(page):
    """The last assistant message once its stream is done (Send is back)."""
    page.wait_for_selector("form.composer button[type=submit]")
    page.wait_for_selector(".messages[aria-busy=false]")
    return page.locator(".messages > li.assistant").last


def set_options(page, **options: float) -> None:
    """Fills the chat's Sampling options (the fold opened first)."""
    fold = page.locator("details.options")
    if fold.get_attribute("open") is None:
        fold.locator("summary").click()
    for name, value in options.items():
        fold.locator(f"input[name={name}]").fill(str(value))


def drop_pngs(page, selector: str, pngs: list[bytes]) -> None:
    """Drops PNG files on an element, as a drag and drop from the desktop does: a `drop` event
    whose DataTransfer holds them."""
    transfer = page.evaluate_handle(
        """(pngs) => {
            const transfer = new DataTransfer();
            pngs.forEach((bytes, i) => transfer.items.add(
                new File([new Uint8Array(bytes)], `dropped-${i}.png`, {type: "image/png"})));
            return transfer;
        }""",
        [list(png) for png in pngs],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def stored_messages(page) -> list[dict]:
    """The current conversation as the page keeps it (localStorage)."""
    return page.evaluate("JSON.parse(localStorage.getItem('ortserve.conversations'))")[0][
        "messages"
    ]


def throttle(page, bytes_per_second: int) -> None:
    """Slows what the page receives (-1: not at all), as a slow network would: the tiny model
    writes a whole answer in a fraction of a second, quicker than a person could press Stop."""
    session = page.context.new_cdp_session(page)
    session.send("Network.enable")
    session.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                 "downloadThroughput": bytes_per_second, "uploadThroughput": -1})  # fmt: skip


def server_answers(context, page) -> list[tuple[str, str, int]]:
    """(method, url, status) of every answer the page's network saw, CORS-blocked ones too
    (the DevTools protocol sees them; scripts and Playwright's events do not)."""
    session = context.new_cdp_session(page)
    sent: dict[str, tuple[str, str]] = {}
    answers: list[tuple[str, str, int]] = []
    session.on(
        "Network.requestWillBeSent",
        lambda e: sent.__setitem__(e["requestId"], (e["request"]["method"], e["request"]["url"])),
    )
    session.on(
        "Network.responseReceivedExtraInfo",
        lambda e: answers.append((*sent.get(e["requestId"], ("?", "?")), e["statusCode"])),
    )
    session.send("Network.enable")
    return answers


# ---- headers and guards ------------------------------------------------------------------------


def test_pages_and_assets_carry_a_strict_content_security_policy(server):
    for path in ("/ui", "/docs", "/ui/app.js", "/ui/vendor/swagger-ui.css", "/ui/missing.js"):
        response = requests.get(server.url + path, timeout=10)
        assert response.headers["Content-Security-Policy"] == CSP, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    policy = dict(part.split(" ", 1) for part in CSP.split("; "))
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in CSP and "http" not in CSP
    assert requests.get(server.url + "/", timeout=10).text == "ortserve is running"
    assert requests.get(server.url + "/ui/../setup.cfg", timeout=10).status_code == 404


def test_a_foreign_origin_cannot_use_the_api_through_the_console(server, browser, foreign_site):
    """A page of another site (evil.test, which the browser resolves to 127.0.0.1) calls the
    server: refused (403) by the Origin guard, so it reads nothing and changes nothing; and
    the console itself, asked for under that name (DNS rebinding), is refused by the Host guard."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"http://{FOREIGN}:{foreign_site}/")  # a real page, served from 127.0.0.1
    answers = server_answers(context, page)
    outcome = page.evaluate(
        """async (base) => {
            const tried = {};
            for (const [path, init] of [
                ["/api/tags", {}],
                ["/api/copy", {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify({source: "demo-chat", destination: "stolen"})}],
                ["/api/copy", {method: "POST", mode: "no-cors",
                               body: JSON.stringify({source: "demo-chat", destination: "stolen"})}],
            ]) {
                try { const r = await fetch(base + path, init); tried[path + init.mode] = r.type + r.status; }
                catch (e) { tried[path + init.mode] = "blocked"; }
            }
            return tried;
        }""",
        server.url,
    )
    assert outcome["/api/tagsundefined"] == "blocked"
    assert outcome["/api/copyundefined"] == "blocked"
    assert outcome["/api/copyno-cors"] == "opaque0"  # sent, left unread by the browser...
    expected = {  # ...and every one refused by the server itself, not only by the browser
        ("GET", f"{server.url}/api/tags", 403),
        ("OPTIONS", f"{server.url}/api/copy", 403),  # the preflight: its POST never went
        ("POST", f"{server.url}/api/copy", 403),
    }
    for _ in range(100):  # DevTools events arrive on their own schedule
        if len([a for a in answers if a[1].startswith(server.url)]) >= len(expected):
            break
        page.wait_for_timeout(100)
    seen = {a for a in answers if a[1].startswith(server.url)}
    # DevTools may drop an event under load (a CI run missed the GET's): whatever was seen
    # was refused, the POST sent without preflight is seen, and the server refuses the
    # foreign Origin's GET when asked directly too
    assert seen <= expected and ("POST", f"{server.url}/api/copy", 403) in seen
    assert len([a for a in answers if a[1].startswith(server.url)]) == len(seen)
    foreign = {"Origin": f"http://{FOREIGN}:{foreign_site}"}
    assert requests.get(server.url + "/api/tags", headers=foreign, timeout=10).status_code == 403
    names = [m["name"] for m in requests.get(server.url + "/api/tags", timeout=10).json()["models"]]
    assert not any(name.startswith("stolen") for name in names)

    rebound = page.goto(f"http://{FOREIGN}:{server.port}/ui")
    assert rebound.status == 403 and "does not answer for host" in rebound.text()
    context.close()


@pytest.fixture
def keyed(library):
    running = Server(library, ORTSERVE_API_KEYS=f"tester:{KEY}")
    yield running
    running.stop()


def test_with_api_keys_the_page_asks_for_one_and_keeps_it_in_session_storage(keyed, browser):
    assert requests.get(keyed.url + "/api/tags", timeout=10).status_code == 401
    assert requests.get(keyed.url + "/ui/app.js", timeout=10).status_code == 200  # a page's file
    context = browser.new_context()
    page = context.new_page()
    page.goto(keyed.url + "/ui#library")
    page.fill("input[name=api-key]", KEY)
    shot(page, "api-key")
    page.click("form.key button[type=submit]")
    page.wait_for_selector("tr[data-model='demo-chat:latest']", timeout=TIMEOUT_MS)
    assert page.evaluate("sessionStorage.getItem('ortserve.key')") == KEY
    assert KEY not in json.dumps(page.evaluate("Object.assign({}, localStorage)"))
    page.goto(keyed.url + "/docs")  # the same tab: the reference uses the same key
    page.wait_for_selector(".swagger-ui .opblock", timeout=TIMEOUT_MS)
    context.close()


# ---- chat ----------------------------------------------------------------------------------------


def test_chat_streams_an_answer_with_its_thinking_apart_and_folded(server, page):
    open_console(page, server)
    page.select_option("select[name=model]", "demo-chat:latest")
    with page.expect_response(lambda r: r.url.endswith("/api/chat")) as answered:
        ask(page, "What colour is a banana?")
    answer = last_answer(page)
    lines = [json.loads(line) for line in answered.value.text().splitlines()]
    assert len(lines) > 3 and lines[-1]["done"]  # streamed: NDJSON, line by line
    assert json.loads(answered.value.request.post_data)["stream"] is True
    content = "".join(line["message"].get("content", "") for line in lines)
    thinking = "".join(line["message"].get("thinking", "") for line in lines)
    assert thinking.strip() and content.strip()
    assert answer.locator(".markdown").inner_text().strip() == content.strip()
    folded = answer.locator("details.thinking")
    assert folded.get_attribute("open") is None
    assert folded.locator(".thought").text_content().strip() == thinking.strip()
    folded.locator("summary").click()
    shot(page, "chat")
    stored = page.evaluate("JSON.parse(localStorage.getItem('ortserve.conversations'))")
    assert stored[0]["messages"][0]["content"] == "What colour is a banana?"


def test_edit_and_resend_replaces_the_rest_of_the_conversation(server, page):
    open_console(page, server)
    page.click("text=New chat")
    page.select_option("select[name=model]", "demo-chat:latest")
    ask(page, "Hi")
    last_answer(page)
    page.click(".messages > li.user button:has-text('Edit')")
    page.fill(".messages > li.editing textarea", "What is the capital of France?")
    page.click("button:has-text('Resend')")
    last_answer(page)
    users = page.locator(".messages > li.user").all_inner_texts()
    assert len(users) == 1 and "capital of France" in users[0]
    assert page.locator(".messages > li.assistant").count() == 1


def test_a_tool_call_from_the_tool_demo_is_answered_by_the_page(server, page):
    open_console(page, server)
    page.click("text=New chat")
    page.select_option("select[name=model]", "demo-chat:latest")
    page.check("input[name=tools]")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as sent:
        ask(page, "What's the weather in Paris?")
    assert json.loads(sent.value.post_data)["tools"][0]["function"]["name"] == "get_weather"
    card = page.locator(".tool-call").first
    card.wait_for()
    assert "get_weather" in card.inner_text() and "Paris" in card.inner_text()
    result = page.locator(".messages > li.tool-result").first
    result.wait_for()
    assert json.loads(result.locator("code").inner_text())["city"] == "Paris"
    page.locator(".messages > li.assistant").nth(1).wait_for()
    final = last_answer(page)
    assert final.locator(".markdown").inner_text().strip()  # the answer after the result
    shot(page, "chat-tools")


def test_json_output_sends_the_schema_and_shows_an_answer_that_matches_it(server, page):
    # "*ripe*" as Markdown would be an emphasised "ripe": the answer must be shown as written
    schema = {"type": "object", "additionalProperties": False,
              "required": ["colour", "ripe", "label"],
              "properties": {"colour": {"enum": ["yellow", "green", "brown"]},
                             "ripe": {"type": "boolean"}, "label": {"const": "*ripe*"}}}  # fmt: skip
    open_console(page, server)
    page.click("text=New chat")
    page.select_option("select[name=model]", "demo-chat:latest")
    page.check("input[name=json]")
    page.fill("textarea[name=schema]", json.dumps(schema))
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as sent:
        ask(page, "What colour is a banana?")
    answer = last_answer(page)
    body = json.loads(sent.value.post_data)
    assert body["format"] == schema and "think" not in body  # no thinking with a grammar
    jsonschema.validate(json.loads(answer.locator("pre.json").inner_text()), schema)
    jsonschema.validate(json.loads(stored_messages(page)[-1]["content"]), schema)
    shot(page, "chat-json")


# ---- a vision model, and a model that writes long (the tiny random ones) --------------------


def test_images_dropped_or_attached_go_with_the_message_to_a_vision_model(
    server, tiny, page, pictures
):
    open_console(page, server)
    page.select_option("select[name=model]", "demo-chat:latest")
    composer = page.locator("form.composer")
    assert composer.get_by_role("button", name="Attach image").count() == 0  # no vision: no hook
    drop_pngs(page, "#prompt", [pictures[0]])
    assert composer.locator(".thumbnails").count() == 0

    open_console(page, tiny)
    page.select_option("select[name=model]", VISION)
    composer.get_by_role("button", name="Attach image").wait_for()
    assert page.get_attribute("#prompt", "placeholder") == "Message (drop images here)"
    drop_pngs(page, "#prompt", [pictures[0]])  # by drag and drop...
    page.set_input_files("form.composer input[name=images]",  # ...and with the keyboard's button
                         files=[{"name": "tall.png", "mimeType": "image/png",
                                 "buffer": pictures[1]}])  # fmt: skip
    drop_pngs(page, "#prompt", [pictures[1]])  # one too many: removed again
    sync_api.expect(composer.locator(".thumbnails img")).to_have_count(3)
    composer.get_by_role("button", name="Remove image 3").click()
    sync_api.expect(composer.locator(".thumbnails img")).to_have_count(2)
    set_options(page, num_predict=8, temperature=0)
    with page.expect_response(lambda r: r.url.endswith("/api/chat")) as answered:
        ask(page, "What is in the picture?")
    answer = last_answer(page)
    sent = json.loads(answered.value.request.post_data)["messages"][0]["images"]
    assert [base64.b64decode(image) for image in sent] == list(pictures)
    assert answered.value.ok and json.loads(answered.value.text().splitlines()[-1])["done"]
    assert answer.locator(".error").count() == 0
    shown = page.locator(".messages > li.user .thumbnails img")
    sync_api.expect(shown).to_have_count(2)
    assert shown.evaluate_all("all => all.map((img) => img.naturalWidth)") == [112, 56]  # decoded
    assert composer.locator(".thumbnails").count() == 0  # sent: the composer is empty again
    shot(page, "chat-vision")


def test_stop_keeps_the_partial_answer_and_the_model_takes_the_next_message(tiny, page):
    open_console(page, tiny)
    page.select_option("select[name=model]", VISION)
    set_options(page, num_predict=2000, temperature=0)  # greedy: it writes to the context's end
    whole = requests.post(tiny.url + "/api/chat", timeout=60, json={
        "model": VISION, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
        "options": {"num_predict": 2000, "temperature": 0}}).json()["message"]["content"]  # fmt: skip
    throttle(page, 10_000)  # ~800 NDJSON lines, ~100 kB: ten seconds
    ask(page, "Hi")
    answer = page.locator(".messages > li.assistant").last
    answer.locator(".markdown").wait_for()  # the first tokens are in
    page.click("form.composer button.stop")
    page.wait_for_selector("form.composer button[type=submit]")
    kept = stored_messages(page)[-1]["content"]
    shown = answer.locator(".markdown").inner_text()
    page.wait_for_timeout(1000)
    assert stored_messages(page)[-1]["content"] == kept  # the stream has ended...
    assert answer.locator(".markdown").inner_text() == shown
    assert 0 < len(kept) < len(whole) and whole.startswith(kept)  # ...its first part kept
    assert answer.locator(".error").inner_text() == "stopped"
    shot(page, "chat-stopped")

    throttle(page, -1)
    set_options(page, num_predict=8)
    with page.expect_response(lambda r: r.url.endswith("/api/chat")) as answered:
        ask(page, "Hi again")
    last_answer(page)
    history = json.loads(answered.value.request.post_data)["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == kept
    assert answered.value.ok and json.loads(answered.value.text().splitlines()[-1])["done"]
    assert page.locator(".messages > li.assistant").last.locator(".error").count() == 0


# ---- library, running, metrics -----------------------------------------------------------------


def test_pull_shows_progress_to_100_then_copy_and_delete(server, page):
    open_console(page, server, "library")
    page.wait_for_selector("tr[data-model='demo-chat:latest']")
    page.fill("input[name=pull]", f"hf.co/{REPO}")
    page.click("form.pull button[type=submit]")
    status = page.locator(".pull-status")
    sync_api.expect(status).to_have_text("success 100%", timeout=TIMEOUT_MS)
    assert page.locator("form.pull progress").get_attribute("value") == "100"
    row = page.locator(f"tr[data-model='hf.co/{REPO}:latest']")
    row.wait_for()
    row.locator("button:has-text('Modelfile')").click()
    sync_api.expect(page.locator("pre.modelfile")).to_contain_text("FROM ")
    shot(page, "library")

    row.locator("button:has-text('Copy')").click()
    page.fill("form.inline input", "console-copy")
    page.click("form.inline button[type=submit]")
    copied = page.locator("tr[data-model='console-copy:latest']")
    copied.wait_for()
    for model in (f"hf.co/{REPO}:latest", "console-copy:latest"):
        page.locator(f"tr[data-model='{model}'] button:has-text('Delete')").click()
        page.click(f"button:has-text('Yes, delete {model}')")
        page.locator(f"tr[data-model='{model}']").wait_for(state="detached")
    names = [m["name"] for m in requests.get(server.url + "/api/tags", timeout=10).json()["models"]]
    assert sorted(names) == ["all-minilm:latest", "demo-chat:latest"]


def test_running_lists_a_loaded_model_and_unloads_it(server, page):
    requests.post(server.url + "/api/generate", json={"model": "demo-chat"}, timeout=60)
    open_console(page, server, "running")
    row = page.locator("tr[data-model='demo-chat:latest']")
    row.wait_for()
    assert row.locator("td[data-label=Provider]").inner_text() == "cpu"
    assert row.locator("td[data-label=Context]").inner_text().isdigit()
    shot(page, "running")
    row.locator("button:has-text('Unload')").click()
    row.wait_for(state="detached")
    assert requests.get(server.url + "/api/ps", timeout=10).json()["models"] == []


def test_metrics_charts_draw_non_empty_series(server, page):
    open_console(page, server, "metrics")
    page.wait_for_selector("figure[data-chart=queue]:not([data-points='0'])")  # one poll in
    body = {"model": "demo-chat", "prompt": "Hi", "stream": False, "options": {"num_predict": 8}}
    assert requests.post(server.url + "/api/generate", json=body, timeout=60).ok
    # (the page's CSP forbids eval: Playwright's wait_for_function cannot run there)
    for chart in ("tokens", "ttft", "queue", "requests"):
        drawn = page.locator(f"figure[data-chart={chart}]:not([data-points='0']) canvas")
        drawn.wait_for()
        assert drawn.bounding_box()["height"] > 50
    shot(page, "metrics")


# ---- the API reference and a narrow screen -----------------------------------------------------


def test_docs_render_the_openapi_document_with_swagger_ui(server, page):
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock")
    paths = json.loads(requests.get(server.url + "/openapi.json", timeout=10).text)["paths"]
    assert page.locator(".swagger-ui .opblock").count() >= len(paths)
    assert page.locator(".swagger-ui .opblock-summary-path[data-path='/api/chat']").count() == 1
    shot(page, "docs")


def test_the_console_is_usable_at_360_pixels(server, browser):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.goto(f"{server.url}/ui#chat")
    page.wait_for_selector("select[name=model]")
    page.select_option("select[name=model]", "demo-chat:latest")
    ask(page, "Hi")
    last_answer(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360  # nothing runs off the side
    shot(page, "chat-360px")
    page.goto(f"{server.url}/ui#library")
    page.wait_for_selector("tr[data-model='demo-chat:latest']")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    shot(page, "library-360px")
    context.close()
