"""
An OpenAI-compatible chat API over one loaded model, on the stdlib ThreadingHTTPServer (no web framework).

    service = ChatService(model, tokenizer, chat=True, model_name="cpu_demo-1a2b")
    server = make_server(service, "127.0.0.1", 8000)     # port 0 picks a free port: server.server_address
    server.serve_forever()

Endpoints:
    GET  /                      -> the web chat page (nanochat/web/chat.html: one file, no external resources)
    POST /v1/chat/completions   {"messages": [...], "temperature", "top_k", "max_tokens", "seed", "stream"}
                                -> a chat.completion, or with stream=true a text/event-stream of
                                   `data: {chat.completion.chunk}` lines ending with `data: [DONE]`
    POST /v1/completions        {"prompt": str, "max_tokens", "temperature", "top_k", "seed", "stop", "echo",
                                 "stream"} -> a text_completion (or its stream): the prompt encoded as the reference
                                 samples a base model (BOS, then the prompt's tokens), continued as plain text
    GET  /v1/models             -> {"object": "list", "data": [{"id": model_name, ...}]}
    GET  /health                -> {"status": "ok", "ready": true, "busy": bool, "model": model_name}

Requests are handled in threads but the model is shared, so generation is serialized by one lock that grants
turns in arrival order (FairLock: CPU inference is one at a time anyway, and no request starves under load). Limits follow reference section 12.2: at most 500
messages, 8000 characters per message, 32000 in all; temperature in [0, 2], top_k in [0, 200], max_tokens in
[1, 4096]. A chat model gets the conversation rendered with its chat tokens (oldest turns dropped when it would
not fit with max_tokens in sequence_len); a base model never learned those tokens, so the last user message is
continued as plain text. Bad requests get a 4xx with an OpenAI-style {"error": {"message", "type", "param"}}.
Run it with `nanorun serve RUN --port 8000` (runners/cli_serve.py).
"""

import json
import random
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from nanochat.engine import Engine, TextStream, fit_conversation, prompt_budget, trim_tokens

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20      # 1 MiB of JSON is far above the character limits
SOCKET_TIMEOUT_SECONDS = 30   # a client silent this long (mid-body, or not reading a stream) is dropped
DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_tokens": 512}
# the page may run only its own inline script/style and talk only to this server
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'")
_page = None


def chat_page():
    """The web chat page's bytes (package data, so a non-editable install has it too); read once."""
    global _page
    if _page is None:
        _page = resources.files("nanochat").joinpath("web/chat.html").read_bytes()
    return _page


class RequestError(Exception):
    """A request the client got wrong -> HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# -----------------------------------------------------------------------------
# Request validation (pure Python, no torch)

def _content_text(content, where):
    """A message's content as one string: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{j}] must be a {{\"type\": \"text\", \"text\": str}} part", where)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where} must be a string or a list of text parts", where)


def _number(body, name, lo, hi, integer):
    value = body.get(name)
    if value is None:
        return DEFAULTS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be in [{lo}, {hi}], got {value}", name)
    return value


def parse_request(body):
    """Validate a /v1/chat/completions body -> {messages: [{role, content}], temperature, top_k, max_tokens,
    seed, stream, include_usage}. Raises RequestError naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} (at most {MAX_MESSAGES})", "messages")
    clean, total = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role not in ("user", "assistant") and not (role == "system" and i == 0):
            hint = " (system only as the first message)" if role == "system" else ""
            raise RequestError(f"{where}.role must be user or assistant{hint}, got {role!r}", f"{where}.role")
        text = _content_text(message.get("content"), f"{where}.content")
        if not text.strip():
            raise RequestError(f"{where}.content is empty", f"{where}.content")
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(f"{where}.content is too long: {len(text)} characters (at most {MAX_MESSAGE_CHARS})",
                               f"{where}.content")
        total += len(text)
        clean.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"messages are too long: {total} characters in all (at most {MAX_TOTAL_CHARS})",
                           "messages")
    start = 1 if clean[0]["role"] == "system" else 0
    for i in range(start, len(clean)):   # the chat format alternates user, assistant, user, ...
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if clean[i]["role"] != expected:
            raise RequestError(f"messages[{i}].role must be {expected} (roles alternate user/assistant)",
                               f"messages[{i}].role")
    if clean[-1]["role"] != "user":
        raise RequestError(f"messages[{len(clean) - 1}] must be a user message (the last one is answered)",
                           f"messages[{len(clean) - 1}].role")
    return {"messages": clean, **_sampling(body, body.get("max_tokens", body.get("max_completion_tokens")))}


COMPLETION_MAX_TOKENS = 16   # the OpenAI default of /v1/completions
MAX_STOPS = 4


def parse_completion_request(body):
    """Validate a /v1/completions body -> {prompt, stop, echo, temperature, top_k, max_tokens, seed, stream,
    include_usage}. Raises RequestError naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (or a list of one string)", "prompt")
    if len(prompt) > MAX_TOTAL_CHARS:
        raise RequestError(f"prompt is too long: {len(prompt)} characters (at most {MAX_TOTAL_CHARS})", "prompt")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or not all(isinstance(x, str) and x for x in stop)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError(f"echo must be true or false, got {echo!r}", "echo")
    for name in ("logprobs", "suffix"):
        if body.get(name) is not None:
            raise RequestError(f"{name} is not supported", name)
    max_tokens = body.get("max_tokens")
    return {"prompt": prompt, "stop": stop, "echo": echo,
            **_sampling(body, COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens)}


def _sampling(body, max_tokens):
    """The options both endpoints share: n (must be 1), temperature, top_k, max_tokens, seed, stream."""
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {n!r}", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    return {
        "temperature": _number(body, "temperature", 0, 2, integer=False),
        "top_k": _number(body, "top_k", 0, 200, integer=True),
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 1, 4096, integer=True),
        "seed": seed if seed is not None else random.randrange(2 ** 31),   # a random seed per request
        "stream": stream,
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
    }


# -----------------------------------------------------------------------------
# The model side

class FairLock:
    """A lock granted in arrival order. threading.Lock is not fair: with 32 clients and 200 short requests a
    request waited up to 9.6 s (p95 6.0 s) behind ones that came later, against 4.0 s (p95 3.9 s) in turn order
    (bench/server_campaign.py, bench/RESULTS.md)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def locked(self):
        with self._cond:
            return self._serving < self._next_ticket


class ChatService:
    """One model + tokenizer shared by all request threads; generate() holds a lock while it runs."""

    def __init__(self, model, tokenizer, chat=True, model_name="nanorun"):
        self.model, self.tokenizer, self.chat, self.model_name = model, tokenizer, chat, model_name
        self.engine = Engine(model, tokenizer)
        self.lock = FairLock()
        self.created = int(time.time())

    def prompt_ids(self, request):
        """The prompt tokens: the rendered chat (chat model) or the last user message as plain text (base)."""
        tok = self.tokenizer
        budget = prompt_budget(self.model.config.sequence_len, request["max_tokens"])
        if self.chat:
            ids, _ = fit_conversation(tok, request["messages"], budget)
            return ids
        bos = tok.get_bos_token_id()
        return trim_tokens(tok.encode(request["messages"][-1]["content"], prepend=bos), budget, bos)

    def completion_ids(self, request):
        """A /v1/completions prompt as the reference samples a base model: BOS, then the prompt's tokens (the
        oldest ones dropped when it would not fit with max_tokens in sequence_len)."""
        tok = self.tokenizer
        budget = prompt_budget(self.model.config.sequence_len, request["max_tokens"])
        bos = tok.get_bos_token_id()
        return trim_tokens(tok.encode(request["prompt"], prepend=bos), budget, bos)

    def generate(self, request, prompt):
        """Yields the reply's text pieces (UTF-8 safe), then returns (completion_tokens, finish_reason)."""
        stops = self.engine._stop_tokens()
        stream, count, finish = TextStream(self.tokenizer), 0, "length"
        with self.lock:
            for column, _ in self.engine.generate(prompt, num_samples=1, max_tokens=request["max_tokens"],
                                                  temperature=request["temperature"], top_k=request["top_k"],
                                                  seed=request["seed"]):
                if column[0] in stops:
                    finish = "stop"
                    break
                count += 1
                piece = stream.push(column[0])
                if piece:
                    yield piece
        rest = stream.flush()
        if rest:
            yield rest
        return count, finish


# -----------------------------------------------------------------------------
# HTTP

class Handler(BaseHTTPRequestHandler):
    server_version = "nanorun"
    service = None   # set on the subclass make_server builds
    quiet = False
    timeout = SOCKET_TIMEOUT_SECONDS   # socketserver applies it to the connection: no thread waits forever

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write(f"serve: {self.address_string()} {fmt % args}\n")

    def _send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e):
        self._send_json(e.status, e.body())

    def _send_page(self):
        data = chat_page()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", PAGE_CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        s = self.service
        if path in ("", "/index.html"):
            self._send_page()
        elif path == "/health":
            self._send_json(200, {"status": "ok", "ready": True, "busy": s.lock.locked(), "model": s.model_name})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "nanorun"}]})
        else:
            self._error(RequestError(f"no such endpoint: GET {path or '/'}", status=404, kind="not_found_error"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        parse = {"/v1/chat/completions": parse_request, "/v1/completions": parse_completion_request}.get(path)
        if parse is None:
            self._error(RequestError(f"no such endpoint: POST {path or '/'}", status=404, kind="not_found_error"))
            return
        try:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise RequestError("a Content-Length header is required", status=411)
            if int(length) > MAX_BODY_BYTES:
                raise RequestError(f"request body too large: {length} bytes (at most {MAX_BODY_BYTES})", status=413)
            # application/json only: a cross-origin page must then pass a CORS preflight, which is never granted,
            # so no web page can drive a local server (there is no Access-Control-Allow-Origin either)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise RequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}", status=415)
            raw = bytearray()
            try:
                while len(raw) < int(length) and (part := self.rfile.read1(int(length) - len(raw))):
                    raw += part
            except TimeoutError:
                pass
            if len(raw) < int(length):
                self.close_connection = True
                raise RequestError(f"the request body ended or stalled after {len(raw)} of {length} bytes",
                                   status=408)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from None
            request = parse(body)
        except RequestError as e:
            self._error(e)
            return
        if path == "/v1/completions":
            self._text_completion(request)
        elif request["stream"]:
            self._stream(request)
        else:
            self._complete(request)

    def _start_events(self):
        """Answer 200 with a text/event-stream and return send(payload): one `data:` event (a dict as JSON)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()   # HTTP/1.0: no length, the stream ends when the connection closes

        def send(payload):
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        return send

    def _complete(self, request):
        s = self.service
        prompt = s.prompt_ids(request)
        pieces, gen = [], s.generate(request, prompt)
        try:
            while True:
                pieces.append(next(gen))
        except StopIteration as done:
            count, finish = done.value
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": s.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": count,
                      "total_tokens": len(prompt) + count},
        })

    def _stream(self, request):
        s = self.service
        prompt = s.prompt_ids(request)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": s.model_name}

        def chunk(delta, finish=None):
            return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])

        send = self._start_events()
        gen = s.generate(request, prompt)
        try:
            send(chunk({"role": "assistant", "content": ""}))
            while True:
                try:
                    piece = next(gen)
                except StopIteration as done:
                    count, finish = done.value
                    break
                send(chunk({"content": piece}))
            send(chunk({}, finish))
            if request["include_usage"]:
                send(dict(base, choices=[], usage={"prompt_tokens": len(prompt), "completion_tokens": count,
                                                   "total_tokens": len(prompt) + count}))
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):   # client gone or stuck: stop, free the lock
            gen.close()


    def _text_completion(self, request):
        """/v1/completions, streaming or not. Stop strings end the text before them (finish_reason "stop"); while
        streaming, the last len(longest stop) - 1 characters are held back until they cannot begin one."""
        s = self.service
        prompt = s.completion_ids(request)
        stops, hold = request["stop"], max((len(x) for x in request["stop"]), default=1) - 1
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": s.model_name}

        def choice(text, finish=None):
            return dict(base, choices=[{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}])

        stream = request["stream"]
        send = self._start_events() if stream else None
        text = request["prompt"] if request["echo"] else ""
        start, sent, count = len(text), 0, None   # stop strings are looked for in the generated text only
        gen = s.generate(request, prompt)
        try:
            while True:
                try:
                    text += next(gen)
                except StopIteration as done:
                    count, finish = done.value
                    break
                found = [i for i in (text.find(x, max(start, sent - hold)) for x in stops) if i >= 0]
                if found:
                    text, finish = text[:min(found)], "stop"
                    gen.close()   # frees the model lock
                    break
                if stream and len(text) - hold > sent:
                    send(choice(text[sent:len(text) - hold]))
                    sent = len(text) - hold
            if count is None:   # ended at a stop string: the tokens of what is kept
                count = len(s.tokenizer.encode(text[start:]))
            usage = {"prompt_tokens": len(prompt), "completion_tokens": count, "total_tokens": len(prompt) + count}
            if not stream:
                self._send_json(200, dict(choice(text, finish), usage=usage))
                return
            if len(text) > sent:
                send(choice(text[sent:]))
            send(choice("", finish))
            if request["include_usage"]:
                send(dict(base, choices=[], usage=usage))
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):   # client gone or stuck: stop, free the lock
            gen.close()


def make_server(service, host="127.0.0.1", port=8000, quiet=False, timeout=SOCKET_TIMEOUT_SECONDS):
    """A ThreadingHTTPServer bound to (host, port) serving `service`; call serve_forever() / shutdown().
    timeout: seconds a connection may stay silent before it is dropped."""
    handler = type("BoundHandler", (Handler,), {"service": service, "quiet": quiet, "timeout": timeout})
    server = _Server((host, port), handler)
    server.daemon_threads = True
    return server


class _Server(ThreadingHTTPServer):
    # the listen backlog: socketserver's default of 5 reset 1 of 1000 connections when 32 clients connected at
    # once (bench/server_campaign.py)
    request_queue_size = 128


def load_service(checkpoint_dir, tokenizer_dir, step=None, chat=None, model_name="nanorun", device=None):
    """Load a checkpoint + tokenizer into a ChatService. chat=None: a chat model when the checkpoint's meta
    says its stage was sft or rl."""
    import torch  # noqa: PLC0415

    from nanochat.checkpoint import load_model  # noqa: PLC0415
    from nanochat.tokenizer import Tokenizer  # noqa: PLC0415
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    model, meta = load_model(checkpoint_dir, step, device)
    model.eval()
    if chat is None:
        chat = meta.get("stage") in ("sft", "rl")
    return ChatService(model, tokenizer, chat=chat, model_name=model_name), meta
