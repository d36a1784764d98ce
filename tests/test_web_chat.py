"""The web chat page (GET / of nanochat.server) driven in a real headless Chromium through Playwright, against the
real server on 127.0.0.1 with a tiny real checkpoint: streaming replies, history, settings, Shift+Enter, inline
4xx errors, New chat, text-only rendering, no third-party requests, and a screenshot.

Needs Debian's chromium and the playwright package (never `playwright install`: we launch /usr/bin/chromium):
    apt-get install -y chromium && .venv/bin/pip install playwright
Without them the test is skipped, or fails when $CI is set. Run: .venv/bin/pytest tests/test_web_chat.py
"""

import json
import os
import threading
import urllib.request

import pytest

from nanochat.server import load_service, make_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


def browser_or_skip():
    """playwright's sync API, or skip (fail under CI) naming what is missing and how to install it."""
    missing = []
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
        missing.append("the playwright package (.venv/bin/pip install playwright)")
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if missing:
        message = "web chat browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_api


@pytest.fixture
def chat_server(tiny_checkpoint, tiny_tokenizer_dir, nanorun_home):
    service, _ = load_service(tiny_checkpoint, tiny_tokenizer_dir, chat=True, model_name="tiny-chat", device="cpu")
    server = make_server(service, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def complete(url, body):
    """The non-streaming reply to `body` (the reference the streamed page text must equal)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def test_web_chat_in_headless_chromium(chat_server, tmp_path):
    sync_api = browser_or_skip()
    url = chat_server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)
            requested, posted, console_errors = [], [], []
            page.on("request", lambda r: requested.append(r.url))
            page.on("request", lambda r: posted.append(json.loads(r.post_data))
                    if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            expect = sync_api.expect
            expect(page).to_have_title("nanorun chat")
            expect(page.locator("#model")).to_have_text("tiny-chat")

            # settings: greedy and short replies, so the page's text can be checked against the API
            page.click("#toggle-settings")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")

            def send_and_wait(text, assistants):
                page.fill("#input", text)
                page.press("#input", "Enter")
                expect(page.locator("#input")).to_have_value("")
                page.wait_for_function("n => document.body.dataset.state === 'idle' && "
                                       "document.querySelectorAll('.msg.assistant').length === n", arg=assistants)
                return page.locator(".msg.assistant").nth(assistants - 1).text_content()

            # turn 1: the streamed reply appears, is non-empty and equals the non-streaming reply
            reply1 = send_and_wait("hello there", 1)
            assert reply1.strip()
            first = [{"role": "user", "content": "hello there"}]
            assert posted[0] == {"messages": first, "stream": True, "stream_options": {"include_usage": True},
                                 "temperature": 0, "max_tokens": 12}
            assert reply1 == complete(url, {"messages": first, "temperature": 0, "max_tokens": 12})
            expect(page.locator(".meta").first).to_contain_text("12 tokens")
            assert page.is_enabled("#send")

            # turn 2 with a system prompt: the request carries the whole history (4 messages)
            page.fill("#system", "be brief")
            reply2 = send_and_wait("and then?", 2)
            assert reply2.strip()
            assert posted[1]["messages"] == [{"role": "system", "content": "be brief"}, *first,
                                             {"role": "assistant", "content": reply1},
                                             {"role": "user", "content": "and then?"}]
            assert reply2 == complete(url, {"messages": posted[1]["messages"], "temperature": 0, "max_tokens": 12})

            # an oversize message: the server's 400 is shown inline and the message is left out of the history
            page.fill("#input", "x" * 8001)
            page.press("#input", "Enter")
            error = page.locator(".msg.error")
            expect(error).to_contain_text("Error 400: messages[5].content is too long: 8001 characters")
            expect(page.locator(".msg.user.failed")).to_have_count(1)
            page.wait_for_function("() => document.body.dataset.state === 'idle'")
            assert page.is_enabled("#send")

            # Shift+Enter is a newline, not a send; markup in a message is shown as text, never parsed
            page.fill("#input", "<img src=x onerror=window.pwned=1> <b>bold</b>")
            page.press("#input", "Shift+Enter")
            page.type("#input", "second line")
            assert page.input_value("#input") == "<img src=x onerror=window.pwned=1> <b>bold</b>\nsecond line"
            assert len(posted) == 3
            send_and_wait(page.input_value("#input"), 3)
            assert page.locator(".msg.user").last.text_content() == \
                "<img src=x onerror=window.pwned=1> <b>bold</b>\nsecond line"
            assert page.locator("#messages img, #messages b").count() == 0
            assert page.evaluate("() => window.pwned === undefined")
            assert len(posted[3]["messages"]) == 6   # system + 2 turns + this one; the 8001-char one is not there
            page.screenshot(path=str(tmp_path / "web_chat.png"), full_page=True)

            # New chat forgets the conversation
            page.click("#new-chat")
            expect(page.locator(".msg")).to_have_count(0)
            send_and_wait("hello there", 1)
            assert [m["role"] for m in posted[4]["messages"]] == ["system", "user"]

            assert all(u.startswith(url + "/") for u in requested), requested   # nothing from other origins
            # the browser itself logs the one 400 response; anything else would be a bug in the page
            assert [m for m in console_errors if "status of 400" not in m] == [], console_errors
        finally:
            browser.close()
    shot = tmp_path / "web_chat.png"
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
