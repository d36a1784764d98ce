"""
The chat screen: pick one of the selected run's checkpoints, type a prompt, watch the tokens stream in.

A base model continues the prompt (BOS + prompt); an sft/rl checkpoint gets the conversation rendered with the
chat special tokens and answers as the assistant, keeping the history for multi-turn. torch and nanochat are
imported only inside the `chat-generate` thread worker, so the rest of the TUI starts without them; a failure
(missing checkpoint, bad tokenizer) becomes a notification, never a crash. Opened with `c`; escape goes back.
"""

from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Select, Static

from nanochat import rundir
from tui import data

MAX_TOKENS = 256
TEMPERATURE = 0.8
TOP_K = 50


class ChatScreen(Screen):
    BINDINGS = [("escape", "app.back", "Back")]

    def __init__(self, home, run_id, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_k=TOP_K):
        super().__init__()
        self.home = home
        self.run_id = run_id
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k}
        self.checkpoints = data.find_checkpoints(rundir.load_run(run_id, home))
        self.loaded = None          # (checkpoint_dir, model, tokenizer, engine), reused across prompts
        self.history = []           # chat checkpoints: [{"role", "content"}], sent back each turn
        self.transcript = ""        # everything shown above the streaming reply
        self.reply = ""             # the reply being streamed
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        options = [(c["label"], i) for i, c in enumerate(self.checkpoints)]
        yield Select(options, id="checkpoint", allow_blank=not options, value=0 if options else Select.NULL,
                     prompt="no checkpoint in this run")
        with VerticalScroll(id="chat-log"):
            yield Static("", id="chat-text", markup=False)
        yield Input(placeholder="type a prompt, enter to send", id="prompt")
        yield Footer()

    def on_mount(self):
        self.title, self.sub_title = "chat", self.run_id
        if not self.checkpoints:
            self.notify(f"run {self.run_id} has no checkpoint yet", severity="warning")
        self.query_one(Input).focus()

    @property
    def checkpoint(self):
        index = self.query_one(Select).value
        return self.checkpoints[index] if isinstance(index, int) and self.checkpoints else None

    def on_select_changed(self, event: Select.Changed):
        self.history, self.transcript, self.reply = [], "", ""  # a new model: a new conversation
        self.render_text()

    def on_input_submitted(self, event: Input.Submitted):
        prompt = event.value.strip()
        if not prompt or self.busy:
            return
        checkpoint = self.checkpoint
        if checkpoint is None:
            self.notify("no checkpoint to chat with", severity="error")
            return
        event.input.value = ""
        self.busy = True
        self.transcript += f"> {prompt}\n"
        self.reply = ""
        self.render_text()
        self.generate_reply(checkpoint, prompt)

    def render_text(self):
        self.query_one("#chat-text", Static).update(self.transcript + self.reply)
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def stream(self, text, num_tokens):
        self.reply = text
        self.sub_title = f"{self.run_id}  {num_tokens} tokens"
        self.render_text()

    def finish(self, prompt, error=None):
        if error is not None:
            self.notify(f"chat failed: {error}", severity="error", timeout=10)
        elif self.checkpoint and self.checkpoint["chat"]:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": self.reply}]
        self.transcript += self.reply + "\n\n"
        self.reply = ""
        self.busy = False
        self.render_text()

    @work(thread=True, exclusive=True, name="chat-generate")
    def generate_reply(self, checkpoint, prompt):
        try:
            self._generate(checkpoint, prompt)
        except Exception as e:  # noqa: BLE001 (shown to the user; the app keeps running)
            self.app.call_from_thread(self.finish, prompt, f"{type(e).__name__}: {e}")
        else:
            self.app.call_from_thread(self.finish, prompt)

    def _generate(self, checkpoint, prompt):
        _, _, tokenizer, engine = self._load(checkpoint)
        if checkpoint["chat"]:
            messages = self.history + [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
            tokens = tokenizer.render_for_completion({"messages": messages})
        else:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        stops = {tokenizer.get_bos_token_id()}
        if "<|assistant_end|>" in tokenizer.get_special_tokens():
            stops.add(tokenizer.encode_special("<|assistant_end|>"))
        generated = []
        prefix = "" if checkpoint["chat"] else prompt  # a base model continues the prompt text
        for column, _ in engine.generate(tokens, num_samples=1, seed=len(self.history), **self.sampling):
            if column[0] in stops:
                break
            generated.append(column[0])
            # decode the whole reply each step: a multi-byte character may span tokens
            self.app.call_from_thread(self.stream, prefix + tokenizer.decode(generated), len(generated))

    def _load(self, checkpoint):
        if self.loaded is not None and self.loaded[0] == checkpoint["checkpoint_dir"]:
            return self.loaded
        if not checkpoint["tokenizer_dir"]:
            raise FileNotFoundError(f"run {self.run_id} has no tokenizer (no tok_train result with tokenizer_dir)")
        import torch  # noqa: PLC0415 (lazy: only the chat needs torch)

        from nanochat.checkpoint import load_model  # noqa: PLC0415
        from nanochat.engine import Engine  # noqa: PLC0415
        from nanochat.tokenizer import Tokenizer  # noqa: PLC0415

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_model(checkpoint["checkpoint_dir"], device=device)
        model.eval()
        tokenizer = Tokenizer.from_directory(checkpoint["tokenizer_dir"])
        self.loaded = (checkpoint["checkpoint_dir"], model, tokenizer, Engine(model, tokenizer))
        return self.loaded
