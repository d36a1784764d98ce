"""
`nanorun serve`: an OpenAI-compatible chat API (POST /v1/chat/completions, GET /v1/models, GET /health) and a web
chat page (GET /) over a recorded run's checkpoint. The HTTP server itself is nanochat/server.py.

    nanorun serve                          # the newest run with a checkpoint, on 127.0.0.1:8000
    nanorun serve cpu_demo --port 8080
    nanorun serve --checkpoint-dir D --tokenizer-dir T --port 0    # port 0: any free port (printed)

    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64}'

RUN is resolved exactly as `nanorun chat` does (runners/cli_chat.resolve_target): a run id, a unique prefix or a
spec name; its sft/rl checkpoint is preferred (a chat model), else base_train's (plain text continuation).
"""

import sys

import click

from nanochat import rundir
from runners.cli import main
from runners.cli_chat import ChatInputError, resolve_target


@main.command("serve")
@click.argument("run", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 = all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0 = any free).")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Checkpoint step (default: the last).")
@click.option("--checkpoint-dir", type=click.Path(), default=None, help="A checkpoint directory instead of the run's.")
@click.option("--tokenizer-dir", type=click.Path(), default=None, help="A tokenizer directory instead of the run's.")
@click.option("--quiet", is_flag=True, help="Do not log every request to stderr.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=None,
              help="Seconds a connection may stay silent (mid-body, or not reading a stream) before it is dropped "
                   "[default: 30].")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="nanorun home (default: $NANORUN_HOME or ~/.cache/nanorun).")
def serve_command(run, host, port, step, checkpoint_dir, tokenizer_dir, quiet, timeout, home):
    """Serve a run's checkpoint as an OpenAI-compatible API (/v1/chat/completions, and /v1/completions for plain
    text, e.g. a base model) and a web chat page.

    Example: nanorun serve cpu_demo --port 8000, then open http://127.0.0.1:8000/ in a browser or use
    base_url http://127.0.0.1:8000/v1 with any OpenAI client.
    """
    target = resolve_target(home or rundir.home(), run, checkpoint_dir, tokenizer_dir)
    from nanochat.server import SOCKET_TIMEOUT_SECONDS, load_service, make_server  # noqa: PLC0415 (torch only here)
    name = target["run_id"] or "nanorun"
    try:
        service, meta = load_service(target["checkpoint_dir"], target["tokenizer_dir"], step,
                                     chat=True if target["chat"] else None, model_name=name)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ChatInputError(str(e).splitlines()[0]) from None
    try:
        server = make_server(service, host, port, quiet=quiet, timeout=timeout or SOCKET_TIMEOUT_SECONDS)
    except OSError as e:
        raise ChatInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound_host, bound_port = server.server_address[:2]
    kind = "chat" if service.chat else "base (plain text continuation)"
    sys.stderr.write(f"serve: model {name} step {meta.get('step')} ({kind}), "
                     f"sequence_len {service.model.config.sequence_len}\n"
                     f"serve: web chat on http://{bound_host}:{bound_port}/\n"
                     f"serve: listening on http://{bound_host}:{bound_port}/v1\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
