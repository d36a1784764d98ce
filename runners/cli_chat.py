"""
`nanorun chat`: talk to a checkpoint of a recorded run in the terminal, the reply streamed token by token.

    nanorun chat                               # the newest run with a checkpoint, interactive
    nanorun chat cpu_demo -p "Why is the sky blue?" -t 0
    nanorun chat --checkpoint-dir D --tokenizer-dir T --step 200

RUN is a run id, a unique prefix of one, or a spec name (its newest run). Its checkpoint is the last chat stage's
(sft, rl) if it has one, else base_train's; the tokenizer is its tok_train's. A chat checkpoint keeps the
conversation as tokens ([BOS] user_start ... user_end assistant_start reply assistant_end ...) and drops the
oldest whole turns when the next prompt plus --max-tokens would not fit in the model's sequence_len. A base
checkpoint never learned the chat tokens: each line is continued as plain text. Interactive commands: `quit` or
`exit` ends, `clear` starts a new conversation. Finding the checkpoint needs no torch; torch is imported only
once the model is loaded.
"""

import os
import sys

import click

from nanochat import rundir
from nanochat.rundir import CHAT_STAGES
from runners.cli import main
from specs.errors import NanorunError


class ChatInputError(NanorunError):
    """A bad RUN / checkpoint / tokenizer (bad input: exit code 2)."""
    exit_code = 2


# -----------------------------------------------------------------------------
# Finding a run's checkpoint and tokenizer (run.json and the stage directories, by nanochat.rundir; no torch)


def resolve_target(home, run=None, checkpoint_dir=None, tokenizer_dir=None):
    """What to chat with -> {run_id, stage, checkpoint_dir, tokenizer_dir, chat}. Without RUN: the newest run
    that has a checkpoint. --checkpoint-dir/--tokenizer-dir override the run's."""
    run_id, stage, record = None, None, None
    if run is not None or checkpoint_dir is None or tokenizer_dir is None:
        if run is not None:
            run_id, _ = rundir.find_run(run, home)   # RunDirError (exit 2) naming an unusable run.json
            record = rundir.load_run(run_id, home)
        else:
            candidates = []
            for i in rundir.run_ids(home):
                try:
                    r = rundir.load_run(i, home)
                except rundir.RunDirError:   # an unusable run.json: not a candidate
                    continue
                if rundir.run_checkpoints(r):
                    candidates.append(r)
            if not candidates:
                raise ChatInputError(f"no run with a checkpoint under {os.path.join(home, 'runs')} "
                                     "(train one with `nanorun apply SPEC`, or pass --checkpoint-dir/--tokenizer-dir)")
            record = max(candidates, key=lambda r: r.get("created_at") or 0)
            run_id = record["run_id"]
    if checkpoint_dir is None:
        found = rundir.run_checkpoints(record)
        if not found:
            raise ChatInputError(f"run {run_id} has no checkpoint yet (no stage has saved a model step)")
        stage, checkpoint_dir = found[0]
    elif not rundir.checkpoint_steps(checkpoint_dir):
        raise ChatInputError(f"no checkpoint in {checkpoint_dir} (expected model_NNNNNN.pt + meta_NNNNNN.json)")
    else:   # a stage directory is named <stage>-<key>, its checkpoints live in <stage dir>/checkpoints
        parent = os.path.basename(os.path.dirname(os.path.abspath(checkpoint_dir)))
        stage = parent.split("-")[0] if "-" in parent else None
    if tokenizer_dir is None:
        tokenizer_dir = rundir.run_tokenizer(record)
        if tokenizer_dir is None:
            raise ChatInputError(f"run {run_id} has no tokenizer (no tok_train output); pass --tokenizer-dir")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.pkl")):
        raise ChatInputError(f"no tokenizer in {tokenizer_dir} (expected tokenizer.pkl)")
    return {"run_id": run_id, "stage": stage, "checkpoint_dir": checkpoint_dir, "tokenizer_dir": tokenizer_dir,
            "chat": stage in CHAT_STAGES}


# -----------------------------------------------------------------------------
# The conversation loop (torch from here on)


def chat(target, prompt=None, temperature=0.6, top_k=50, max_tokens=256, step=None, stdin=None, out=None,
         err=None):
    """One reply to `prompt`, or an interactive session over the lines of `stdin`. Replies stream to `out`."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    import torch  # noqa: PLC0415 (only this command needs torch)

    from nanochat.checkpoint import load_model  # noqa: PLC0415
    from nanochat.engine import Engine, TextStream, prompt_budget, trim_tokens  # noqa: PLC0415
    from nanochat.tokenizer import Tokenizer  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = Tokenizer.from_directory(target["tokenizer_dir"])
        model, meta = load_model(target["checkpoint_dir"], step, device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ChatInputError(str(e).splitlines()[0]) from None
    model.eval()
    is_chat = target["chat"] or meta.get("stage") in CHAT_STAGES
    label = f"run {target['run_id']} " if target["run_id"] else ""
    err.write(f"chat: {label}{target['stage'] or 'checkpoint'} step {meta.get('step')} "
              f"({sum(p.numel() for p in model.parameters()):,} params, sequence_len {model.config.sequence_len}) "
              f"on {device}\n")
    if not is_chat:
        err.write("note: a base model (no chat tokens trained): your text is continued, not answered\n")
    err.flush()

    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    sp = {name: tokenizer.encode_special(name) for name in
          ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")}
    stops = {bos, sp["<|assistant_end|>"]}
    budget = prompt_budget(model.config.sequence_len, max_tokens)
    history = [bos]   # chat mode: the whole conversation as tokens

    def reply(text, turn):
        nonlocal history
        if is_chat:
            history += [sp["<|user_start|>"], *tokenizer.encode(text), sp["<|user_end|>"], sp["<|assistant_start|>"]]
            history = trim_tokens(history, budget, bos, sp["<|user_start|>"])   # oldest whole turns go first
            tokens = history
        else:
            tokens = trim_tokens(tokenizer.encode(text, prepend=bos), budget, bos)
        stream, generated = TextStream(tokenizer), []
        for column, _ in engine.generate(tokens, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                         top_k=top_k, seed=turn):
            if column[0] in stops:
                break
            generated.append(column[0])
            out.write(stream.push(column[0]))
            out.flush()
        out.write(stream.flush() + "\n")
        out.flush()
        if is_chat:   # close the turn even when it stopped on length, so the next one starts cleanly
            history += generated + [sp["<|assistant_end|>"]]

    if prompt is not None:
        reply(prompt, 0)
        return
    interactive = stdin.isatty()
    if interactive:
        err.write("type a message; 'clear' starts over, 'quit' or 'exit' ends\n")
    turn = 0
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("quit", "exit"):
            break
        if text == "clear":
            history = [bos]
            err.write("(conversation cleared)\n")
            continue
        if text:
            reply(text, turn)
            turn += 1


@main.command("chat")
@click.argument("run", required=False)
@click.option("-p", "--prompt", default=None, help="One prompt: print the reply and exit.")
@click.option("-t", "--temperature", type=click.FloatRange(min=0), default=0.6, show_default=True,
              help="Sampling temperature (0 = greedy, deterministic).")
@click.option("-k", "--top-k", type=click.IntRange(min=0), default=50, show_default=True,
              help="Sample from the k most likely tokens (0 = all).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens per reply.")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Checkpoint step (default: the last).")
@click.option("--checkpoint-dir", type=click.Path(), default=None, help="A checkpoint directory instead of the run's.")
@click.option("--tokenizer-dir", type=click.Path(), default=None, help="A tokenizer directory instead of the run's.")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="nanorun home (default: $NANORUN_HOME or ~/.cache/nanorun).")
def chat_command(run, prompt, temperature, top_k, max_tokens, step, checkpoint_dir, tokenizer_dir, home):
    """Chat with a run's checkpoint (sft if it has one, else base), streaming the reply.

    Example: nanorun chat cpu_demo -p "The capital of France is" -t 0
    """
    target = resolve_target(home or rundir.home(), run, checkpoint_dir, tokenizer_dir)
    chat(target, prompt=prompt, temperature=temperature, top_k=top_k, max_tokens=max_tokens, step=step)
