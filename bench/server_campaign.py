"""
Load and abuse campaign against a real `nanorun serve` process (issue 14): many streaming clients at once, clients
that stall or never read, oversize and malformed bodies, and the server's memory over the whole campaign.

    .venv/bin/python bench/server_campaign.py                       # full size: 32 clients, 1000 requests
    .venv/bin/python bench/server_campaign.py --clients 8 --requests 100 --slow 2   # a quick sample
    .venv/bin/python bench/server_campaign.py --checkpoint-dir RUN/.../checkpoints --tokenizer-dir TOK

Without --checkpoint-dir it builds a throwaway model (depth 1, random weights) and tokenizer in a temp dir, so the
campaign measures the server, not the model. Prints one table of figures and exits 1 if any invariant broke:
every well-formed request answered completely, every bad one refused with the documented status, stalled
clients dropped without holding the others up, /health answering throughout, RSS growth bounded.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_throwaway(tmp):
    """A vocab-512 tokenizer on generated text and a depth-1 random-weight checkpoint under tmp."""
    import torch

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(0)
    words = "the a river king ship sea night garden letter question answer walked spoke quickly because".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for _ in range(3000)]
    tok_dir = os.path.join(tmp, "tokenizer")
    train_tokenizer(iter(texts), 512).save(tok_dir)
    tok = Tokenizer.from_directory(tok_dir)
    config = GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = build_model(config, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name in ("<|bos|>", "<|assistant_end|>"):   # replies run to max_tokens
            model.lm_head.weight[tok.special_tokens[name]] = 0.0
    ckpt = os.path.join(tmp, "checkpoints")
    save_checkpoint(ckpt, 1, model.state_dict(), None, {"model_config": vars(config)})
    return ckpt, tok_dir


def start_server(ckpt, tok_dir, home, timeout_s):
    env = dict(os.environ, NANORUN_HOME=home, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "runners", "serve", "--port", "0", "--quiet", "--checkpoint-dir", ckpt,
           "--tokenizer-dir", tok_dir, "--timeout", str(timeout_s)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = []
    while not lines or "listening on" not in lines[-1]:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("server did not start:\n" + "".join(lines))
        lines.append(line)
    host, port = lines[-1].split("listening on http://")[1].strip().removesuffix("/v1").rsplit(":", 1)
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
    return proc, host, int(port)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def request(host, port, body, path="/v1/chat/completions", timeout=120, raw=None, headers=None):
    """(status, text, seconds) of one POST."""
    t0 = time.time()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    conn.close()
    return resp.status, text, time.time() - t0


def complete_ok(status, text, stream, max_tokens):
    if status != 200:
        return False
    if not stream:
        out = json.loads(text)
        return out["usage"]["completion_tokens"] == max_tokens
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return events and events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def campaign_load(host, port, clients, requests_total, max_tokens):
    """`clients` threads share `requests_total` requests, 3 in 4 streaming."""
    lock, counter, lat, bad = threading.Lock(), [0], [], []

    def worker(i):
        rng = random.Random(i)
        while True:
            with lock:
                if counter[0] >= requests_total:
                    return
                counter[0] += 1
                n = counter[0]
            stream = n % 4 != 0
            body = {"messages": [{"role": "user", "content": f"hello {i} {n} " + "x" * rng.randint(0, 200)}],
                    "max_tokens": max_tokens, "seed": n, "stream": stream}
            try:
                status, text, dt = request(host, port, body)
                ok = complete_ok(status, text, stream, max_tokens)
            except Exception as e:  # noqa: BLE001 (counted as a failure and reported)
                ok, dt, status = False, 0.0, repr(e)
            with lock:
                lat.append(dt)
                if not ok:
                    bad.append(status)

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.time() - t0, "latencies": lat, "failures": bad}


def stalled_body(host, port, promised=1000):
    """Headers and a part of the body, then silence: the server must answer 408 and close."""
    sock = socket.create_connection((host, port), timeout=120)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {promised}\r\n\r\n".encode() + b'{"messages": [')
    t0 = time.time()
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    return reply.split(b"\r\n", 1)[0].decode(), time.time() - t0


def non_reader(host, port, max_tokens):
    """A streaming request whose reader never reads (the socket's buffers fill): returns the open socket."""
    sock = socket.create_connection((host, port), timeout=120)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


BAD_BODIES = [
    (b"{not json", 400), (b"[]", 400), (b'{"messages": "hi"}', 400), (b'{"messages": []}', 400),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400), (b'{"messages": [{"role": "user"}]}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_k": 1e309}', 400),
    (b"\xff\xfe\x00garbage", 400),
]


def campaign_bad(host, port, n, rng):
    """n malformed requests drawn from BAD_BODIES plus random byte strings; oversize bodies; wrong types."""
    wrong = []
    for i in range(n):
        if i % 3 == 2:
            raw, want = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))), 400
        else:
            raw, want = BAD_BODIES[i % len(BAD_BODIES)]
        status, text, _ = request(host, port, None, raw=raw)
        if status != want or "error" not in json.loads(text):
            wrong.append((raw[:40], status))
    # oversize: refused from the header, before the body is read
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders(b"{}")
    oversize = conn.getresponse().status
    conn.close()
    status, _, _ = request(host, port, None, raw=b"{}", headers={"Content-Type": "text/plain"})
    return {"wrong": wrong, "oversize_status": oversize, "text_plain_status": status}


def health(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/health")
    status = conn.getresponse().status
    conn.close()
    return status


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="well-formed requests in the load phase")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slow", type=int, default=8, help="stalled-body clients and never-reading clients, each")
    ap.add_argument("--bad", type=int, default=100, help="malformed requests")
    ap.add_argument("--socket-timeout", type=float, default=5.0, help="the server's idle-connection timeout (s)")
    ap.add_argument("--rss-growth-mib", type=float, default=64.0, help="allowed RSS growth after warmup")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, tok_dir = args.checkpoint_dir, args.tokenizer_dir
        if not ckpt:
            ckpt, tok_dir = build_throwaway(tmp)
        proc, host, port = start_server(ckpt, tok_dir, os.path.join(tmp, "home"), args.socket_timeout)
        failures = []
        try:
            warm = campaign_load(host, port, 4, 40, args.max_tokens)
            rss0 = rss_mib(proc.pid)
            load = campaign_load(host, port, args.clients, args.requests, args.max_tokens)
            # abuse: stalled bodies and never-reading streams while a quarter of the load runs beside them
            stalls = []
            stall_threads = [threading.Thread(target=lambda: stalls.append(stalled_body(host, port)))
                             for _ in range(args.slow)]
            for t in stall_threads:
                t.start()
            sleepers = [non_reader(host, port, 4000) for _ in range(args.slow)]
            abuse = campaign_load(host, port, max(1, args.clients // 4), max(1, args.requests // 4), args.max_tokens)
            for t in stall_threads:
                t.join(timeout=args.socket_timeout * 10 + 60)
            for sock in sleepers:
                sock.close()
            rng = random.Random(0)
            bad = campaign_bad(host, port, args.bad, rng)
            rss1 = rss_mib(proc.pid)
            again = campaign_load(host, port, args.clients, args.requests // 4, args.max_tokens)
            rss2 = rss_mib(proc.pid)
            alive = health(host, port)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    lat = sorted(load["latencies"])
    q = statistics.quantiles(lat, n=20) if len(lat) >= 20 else [float("nan")] * 19
    print(f"server campaign: {args.clients} clients, {args.requests} requests (3/4 streaming, {args.max_tokens} "
          f"tokens each), then {args.slow} stalled + {args.slow} non-reading clients, {args.bad} malformed "
          f"requests, socket timeout {args.socket_timeout:g}s")
    print("| phase | figure |\n|---|---|")
    print(f"| load | {len(lat)} answered in {load['wall_s']:.1f}s = {len(lat) / load['wall_s']:.1f} req/s; "
          f"latency p50 {q[9]:.2f}s, p95 {q[18]:.2f}s, max {lat[-1]:.2f}s; failures {len(load['failures'])} |")
    print(f"| stalled bodies | {len(stalls)} of {args.slow} answered: "
          f"{sorted(set(s[0] for s in stalls))}, after {max((s[1] for s in stalls), default=0):.1f}s at most |")
    print(f"| beside them | {len(abuse['latencies'])} requests from {max(1, args.clients // 4)} clients while "
          f"{args.slow} never-reading streams of up to 4000 tokens held their turns: max latency "
          f"{max(abuse['latencies'], default=0):.2f}s; failures {len(abuse['failures'])} |")
    print(f"| malformed | {args.bad - len(bad['wrong'])} of {args.bad} refused as documented; oversize -> "
          f"{bad['oversize_status']}; text/plain -> {bad['text_plain_status']} |")
    print(f"| memory | RSS {rss0:.0f} MiB after warmup, {rss1:.0f} after the campaign, {rss2:.0f} after "
          f"{len(again['latencies'])} more (growth {rss2 - rss0:+.0f} MiB) |")
    print(f"| health | /health {alive} at the end; warmup failures {len(warm['failures'])}, "
          f"second load failures {len(again['failures'])} |")

    if load["failures"] or again["failures"] or warm["failures"] or abuse["failures"]:
        failures.append(f"load failures: {(load['failures'] + abuse['failures'] + again['failures'])[:5]}")
    if len(stalls) != args.slow or any(not s[0].endswith("408 Request Timeout") for s in stalls):
        failures.append(f"stalled clients not dropped with 408: {stalls[:3]}")
    if bad["wrong"]:
        failures.append(f"malformed requests answered wrongly: {bad['wrong'][:5]}")
    if bad["oversize_status"] != 413 or bad["text_plain_status"] != 415:
        failures.append(f"oversize -> {bad['oversize_status']}, text/plain -> {bad['text_plain_status']}")
    if rss2 - rss0 > args.rss_growth_mib:
        failures.append(f"RSS grew {rss2 - rss0:.0f} MiB (> {args.rss_growth_mib:g})")
    if alive != 200:
        failures.append(f"/health {alive}")
    for f in failures:
        print("FAIL:", f)
    print("result:", "FAIL" if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
