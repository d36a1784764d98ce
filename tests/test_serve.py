"""`nanorun serve` / nanochat.server: a real ThreadingHTTPServer on 127.0.0.1 (port 0) over a real tiny
checkpoint; plain urllib for JSON and SSE, the openai client, every 4xx case, concurrent load, and the CLI in a
subprocess. Run: .venv/bin/pytest tests/test_serve.py"""

import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from nanochat.server import MAX_MESSAGE_CHARS, load_service, make_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(service):
    server = make_server(service, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def chat_url(tiny_checkpoint, tiny_tokenizer_dir):
    service, _ = load_service(tiny_checkpoint, tiny_tokenizer_dir, chat=True, model_name="tiny-chat", device="cpu")
    server, url = _start(service)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint, tiny_tokenizer_dir):
    service, _ = load_service(tiny_checkpoint, tiny_tokenizer_dir, model_name="tiny-base", device="cpu")
    assert not service.chat   # meta has no sft/rl stage
    server, url = _start(service)
    yield url
    server.shutdown()
    server.server_close()


def post(url, body, raw=None, path="/v1/chat/completions"):
    """(status, parsed JSON or raw text) of a POST to `path`."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text, status, ctype = r.read().decode(), r.status, r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        text, status, ctype = e.read().decode(), e.code, e.headers["Content-Type"]
    return status, (json.loads(text) if ctype == "application/json" else text)


def get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def user(text):
    return [{"role": "user", "content": text}]


def sse_events(text):
    """The `data:` payloads of an event stream, checking the framing."""
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text[:300]
    return [b[len("data: "):] for b in blocks]


def test_models_and_health(chat_url):
    assert get(chat_url, "/health") == (200, {"status": "ok", "ready": True, "busy": False, "model": "tiny-chat"})
    status, models = get(chat_url, "/v1/models")
    assert status == 200 and models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-chat"]
    status, err = get(chat_url, "/v1/nope")
    assert status == 404 and "no such endpoint: GET /v1/nope" in err["error"]["message"]


def test_web_chat_page(chat_url):
    """GET / is the self-contained chat page (the browser test is tests/test_web_chat.py)."""
    with urllib.request.urlopen(chat_url + "/", timeout=30) as r:
        page, headers = r.read().decode(), r.headers
    assert headers["Content-Type"] == "text/html; charset=utf-8" and int(headers["Content-Length"]) == len(page)
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert page.startswith("<!DOCTYPE html>") and "/v1/chat/completions" in page and "stream: true" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page   # nothing external to load
    assert ".innerHTML" not in page and page.isascii()
    with urllib.request.urlopen(chat_url + "/index.html?x=1", timeout=30) as r:
        assert r.read().decode() == page


def test_non_streaming_completion_shape_usage_and_determinism(chat_url):
    body = {"messages": user("hello there"), "max_tokens": 7, "temperature": 0}
    status, out = post(chat_url, body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "tiny-chat" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"      # stop tokens were zeroed: it runs to max_tokens
    usage = out["usage"]
    assert usage["completion_tokens"] == 7 and usage["prompt_tokens"] > 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    assert post(chat_url, body)[1]["choices"] == out["choices"]   # greedy: the same reply
    # a longer conversation (system + earlier turns) changes the prompt
    longer = [{"role": "system", "content": "be brief"}, *user("hi"), {"role": "assistant", "content": "hello"},
              *user("hello there")]
    status, out2 = post(chat_url, dict(body, messages=longer))
    assert status == 200 and out2["usage"]["prompt_tokens"] > usage["prompt_tokens"]
    # a conversation longer than sequence_len (48) is trimmed, not an error
    status, out3 = post(chat_url, {"messages": user("the king walked to the sea " * 40), "max_tokens": 8})
    assert status == 200 and out3["usage"]["prompt_tokens"] <= 48 and out3["usage"]["completion_tokens"] == 8


def test_streaming_matches_non_streaming(chat_url):
    body = {"messages": user("hello there"), "max_tokens": 9, "temperature": 0, "seed": 3}
    _, whole = post(chat_url, body)
    status, text = post(chat_url, dict(body, stream=True, stream_options={"include_usage": True}))
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert content == whole["choices"][0]["message"]["content"]
    assert len(chunks) > 4   # streamed in pieces, not one block


def test_base_model_continues_the_last_user_message(base_url, chat_url):
    body = {"messages": [*user("ignored"), {"role": "assistant", "content": "x"}, *user("the king walked")],
            "max_tokens": 6, "temperature": 0}
    status, out = post(base_url, body)
    assert status == 200 and out["model"] == "tiny-base"
    # plain text: BOS + the last message's tokens only (no chat tokens, earlier turns unused)
    _, alone = post(base_url, dict(body, messages=user("the king walked")))
    assert out["usage"] == alone["usage"] and out["choices"] == alone["choices"]
    _, chat = post(chat_url, dict(body, messages=user("the king walked")))
    assert chat["usage"]["prompt_tokens"] == out["usage"]["prompt_tokens"] + 3   # user_start/end, assistant_start


def test_openai_client(chat_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=chat_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    out = client.chat.completions.create(model="tiny-chat", messages=user("hello there"), max_tokens=5,
                                         temperature=0)
    assert out.choices[0].message.content and out.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="tiny-chat", messages=user("hello there"), max_tokens=5,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=user("hi"), temperature=3)
    assert "temperature must be in [0, 2]" in str(e.value)


BAD = [
    ({"messages": []}, "messages must be a non-empty list", "messages"),
    ({}, "messages must be a non-empty list", "messages"),
    ({"messages": user("x") * 2 * 251}, "too many messages: 502", "messages"),
    ({"messages": [*user("a"), {"role": "assistant", "content": "b"}, *user("c"), {"role": "tool", "content": "d"}]},
     "messages[3].role must be user or assistant", "messages[3].role"),
    ({"messages": [*user("a"), {"role": "system", "content": "b"}]},
     "messages[1].role must be user or assistant (system only as the first message)", "messages[1].role"),
    ({"messages": [*user("a"), *user("b")]}, "messages[1].role must be assistant", "messages[1].role"),
    ({"messages": [*user("a"), {"role": "assistant", "content": "b"}]}, "messages[1] must be a user message",
     "messages[1].role"),
    ({"messages": user("  ")}, "messages[0].content is empty", "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content must be a string", "messages[0].content"),
    ({"messages": user("x" * (MAX_MESSAGE_CHARS + 1))}, "messages[0].content is too long: 8001",
     "messages[0].content"),
    ({"messages": [*user("x" * 8000), {"role": "assistant", "content": "y" * 8000}] * 2 + user("z" * 8000)},
     "40000 characters in all (at most 32000)", "messages"),
    ({"messages": user("hi"), "temperature": 2.5}, "temperature must be in [0, 2], got 2.5", "temperature"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature must be a number", "temperature"),
    ({"messages": user("hi"), "top_k": 201}, "top_k must be in [0, 200]", "top_k"),
    ({"messages": user("hi"), "top_k": 1.5}, "top_k must be an integer", "top_k"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens must be in [1, 4096]", "max_tokens"),
    ({"messages": user("hi"), "max_tokens": 5000}, "max_tokens must be in [1, 4096]", "max_tokens"),
    ({"messages": user("hi"), "n": 2}, "n must be 1", "n"),
    ({"messages": user("hi"), "stream": "yes"}, "stream must be true or false", "stream"),
    ({"messages": user("hi"), "seed": "s"}, "seed must be an integer", "seed"),
    (["not", "an", "object"], "the request body must be a JSON object", None),
]


@pytest.mark.parametrize("body,message,param", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_requests_are_400_with_openai_error(chat_url, body, message, param):
    status, out = post(chat_url, body)
    assert status == 400, out
    assert message in out["error"]["message"]
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param


def test_bad_http_level_requests(chat_url):
    status, out = post(chat_url, None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    conn = http.client.HTTPConnection(chat_url.removeprefix("http://"), timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str((1 << 20) + 1))   # refused before the body is read
    conn.endheaders(b"{}")
    response = conn.getresponse()
    assert response.status == 413 and "too large" in json.loads(response.read())["error"]["message"]
    conn.close()
    req = urllib.request.Request(chat_url + "/v1/embeddings", data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404
    assert get(chat_url, "/health")[0] == 200   # still serving


def test_no_cross_origin_access(chat_url):
    """No Access-Control-Allow-Origin anywhere, and only application/json bodies (which force a CORS preflight that
    is never granted), so a web page cannot drive a local server."""
    req = urllib.request.Request(chat_url + "/v1/chat/completions", headers={"Content-Type": "text/plain"},
                                 data=json.dumps({"messages": user("hi"), "max_tokens": 2}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 415 and "application/json" in json.loads(e.value.read())["error"]["message"]
    status, out = post(chat_url, {"messages": user("hi"), "max_tokens": 2})
    assert status == 200
    with urllib.request.urlopen(chat_url + "/health", timeout=10) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    conn = http.client.HTTPConnection(chat_url.removeprefix("http://"), timeout=10)
    conn.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                              "Access-Control-Request-Method": "POST"})
    response = conn.getresponse()
    assert response.status >= 400 and response.getheader("Access-Control-Allow-Origin") is None
    conn.close()


def test_stalled_client_is_dropped(tiny_checkpoint, tiny_tokenizer_dir):
    """A client that promises a body and stops sending gets 408 once the socket timeout passes; the server goes on."""
    import socket
    service, _ = load_service(tiny_checkpoint, tiny_tokenizer_dir, chat=True, device="cpu")
    server = make_server(service, "127.0.0.1", 0, quiet=True, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        sock = socket.create_connection(server.server_address[:2], timeout=20)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.0 408") and b"stalled after 14 of 1000 bytes" in reply, reply[:300]
        assert get(url, "/health")[0] == 200
        status, out = post(url, {"messages": user("hi"), "max_tokens": 2})
        assert status == 200 and out["choices"][0]["message"]["content"] is not None
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_load(chat_url):
    """8 threads x 3 requests (half streaming) against one shared model: every response complete, no error."""
    results, errors = [], []

    def worker(i):
        try:
            for j in range(3):
                body = {"messages": user(f"hello {i} {j}"), "max_tokens": 6, "seed": i * 10 + j}
                if (i + j) % 2:
                    status, text = post(chat_url, dict(body, stream=True))
                    events = sse_events(text)
                    ok = status == 200 and events[-1] == "[DONE]" and \
                        json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
                else:
                    status, out = post(chat_url, body)
                    ok = status == 200 and out["usage"]["completion_tokens"] == 6
                results.append(ok)
        except Exception as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 24 and all(results)
    assert get(chat_url, "/health")[1]["busy"] is False


def test_cli_serve_subprocess(nanorun_home, tiny_checkpoint, tiny_tokenizer_dir):
    env = dict(os.environ, NANORUN_HOME=nanorun_home, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", "from runners.cli import main; main()", "serve", "--port", "0",
                             "--quiet", "--checkpoint-dir", tiny_checkpoint, "--tokenizer-dir", tiny_tokenizer_dir],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        while not lines or "listening on" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert "base (plain text continuation)" in lines[0] and "step 5" in lines[0]
        url = lines[-1].split("listening on ")[1].strip().removesuffix("/v1")
        status, out = post(url, {"messages": user("hello"), "max_tokens": 4})
        assert status == 200 and out["model"] == "nanorun" and out["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # bad input is one line and exit code 2
    bad = subprocess.run([sys.executable, "-c", "from runners.cli import main; main()", "serve", "nope"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: unknown run 'nope' (no run directory in {os.path.join(nanorun_home, 'runs')}; see `nanorun runs`)"]


# -----------------------------------------------------------------------------
# /v1/completions: plain text in, plain text out (base models)


def complete(url, body):
    return post(url, body, path="/v1/completions")


def test_text_completion_is_the_reference_sampling_prompt(base_url, tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    status, out = complete(base_url, {"prompt": "the king walked", "max_tokens": 6, "temperature": 0})
    assert status == 200, out
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny-base"
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("length", "stop")
    # BOS, then the prompt's tokens: what the base model's chat endpoint feeds for a lone user message too
    assert out["usage"]["prompt_tokens"] == len(tok.encode("the king walked", prepend=tok.get_bos_token_id()))
    _, chat = post(base_url, {"messages": user("the king walked"), "max_tokens": 6, "temperature": 0})
    assert choice["text"] == chat["choices"][0]["message"]["content"]
    assert out["usage"] == chat["usage"]
    _, again = complete(base_url, {"prompt": ["the king walked"], "max_tokens": 6, "temperature": 0})
    assert again["choices"][0]["text"] == choice["text"]
    _, echoed = complete(base_url, {"prompt": "the king walked", "max_tokens": 6, "temperature": 0, "echo": True})
    assert echoed["choices"][0]["text"] == "the king walked" + choice["text"]
    _, default = complete(base_url, {"prompt": "the king walked", "temperature": 0})
    assert default["usage"]["completion_tokens"] <= 16   # OpenAI's default max_tokens for completions


def test_text_completion_stop_strings_and_streaming(base_url):
    body = {"prompt": "the", "max_tokens": 24, "temperature": 0}
    _, full = complete(base_url, body)
    text = full["choices"][0]["text"]
    assert len(text) >= 6, text
    stop = text[3:6]
    want = text[:text.find(stop)]
    _, cut = complete(base_url, dict(body, stop=[stop, "\u0000never"]))
    assert cut["choices"][0]["text"] == want and cut["choices"][0]["finish_reason"] == "stop"
    for options in ({}, {"stop": stop}, {"echo": True}):
        status, raw = complete(base_url, dict(body, stream=True, stream_options={"include_usage": True}, **options))
        assert status == 200
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "text_completion" for c in chunks)
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        _, plain = complete(base_url, dict(body, **options))
        assert streamed == plain["choices"][0]["text"]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == plain["choices"][0]["finish_reason"] and not any(finishes[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_text_completion_with_the_openai_client(base_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model="tiny-base", prompt="the king walked", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text and out.usage.completion_tokens == 5
    stream = client.completions.create(model="tiny-base", prompt="the king walked", max_tokens=5, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-base", prompt="x", stop=["a", "b", "c", "d", "e"])
    assert "stop must be" in str(e.value)


BAD_COMPLETIONS = [
    ({}, "prompt must be a string", "prompt"),
    ({"prompt": ["a", "b"]}, "prompt must be a string", "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt must be a string", "prompt"),
    ({"prompt": "x" * 32001}, "prompt is too long: 32001", "prompt"),
    ({"prompt": "x", "stop": ""}, "stop must be a non-empty string", "stop"),
    ({"prompt": "x", "stop": 3}, "stop must be", "stop"),
    ({"prompt": "x", "echo": "yes"}, "echo must be true or false", "echo"),
    ({"prompt": "x", "logprobs": 2}, "logprobs is not supported", "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be in [1, 4096]", "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature must be in [0, 2]", "temperature"),
    ({"prompt": "x", "n": 3}, "n must be 1", "n"),
]


@pytest.mark.parametrize("body,message,param", BAD_COMPLETIONS, ids=[b[1][:30] for b in BAD_COMPLETIONS])
def test_bad_text_completion_requests(base_url, body, message, param):
    status, out = complete(base_url, body)
    assert status == 400, out
    assert message in out["error"]["message"] and out["error"]["param"] == param


def test_model_turns_are_granted_in_arrival_order():
    """FairLock: threads that queue while the lock is held get it in the order they asked."""
    from nanochat.server import FairLock
    import time
    lock, order = FairLock(), []
    lock.__enter__()   # ticket 0
    assert lock.locked()

    def take(i):
        with lock:
            order.append(i)

    threads = []
    for i in range(6):
        t = threading.Thread(target=take, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.time() + 10
        while lock._next_ticket < i + 2 and time.time() < deadline:   # thread i holds ticket i + 1
            time.sleep(0.001)
    lock.__exit__(None, None, None)
    for t in threads:
        t.join(timeout=10)
    assert order == list(range(6))
    assert not lock.locked()


def test_server_campaign_sample():
    """A small sample of bench/server_campaign.py (full size: 32 clients, 1000 requests, 8+8 slow clients, 100
    malformed; figures in bench/RESULTS.md) against a real `nanorun serve` process."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "server_campaign.py"), "--clients", "4",
                          "--requests", "24", "--slow", "1", "--bad", "12", "--socket-timeout", "2",
                          "--max-tokens", "8"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and "result: PASS" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
