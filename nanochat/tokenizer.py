"""
GPT-4-style regex byte-level BPE tokenizer: trained with the `tokenizers` library (fast Rust trainer),
encoded with `tiktoken` (fast Rust encoder, ~10x HF). Both see the same ids: single bytes are ranks 0..255
by byte value, merges follow in training order, and the 9 special tokens come last.

    tok = train_tokenizer(iter_of_texts, vocab_size=32768)
    tok.save("out/tokenizer")                   # tokenizer.json (HF), tokenizer.pkl, token_bytes.pt
    tok = Tokenizer.from_directory("out/tokenizer")
    ids = tok.encode("hello", prepend="<|bos|>")

Chat rendering (render_conversation / render_for_completion) follows reference/nanochat.md section 7.
"""

import json
import os
import pickle

import tiktoken
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# GPT-4 cl100k split pattern with numbers split into groups of at most 2 digits (LOG Jan 13: best val bpb).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; also the separator/pad token
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",    # the assistant calls the python/calculator tool
    "<|output_start|>", "<|output_end|>",    # the tool's output, written back into the context
]


# -----------------------------------------------------------------------------
# GPT-2 byte <-> unicode table. Byte-level BPE represents every byte as one printable unicode character;
# HF token strings use these characters, tiktoken uses raw bytes.

def _bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _hf_string_to_bytes(s):
    return bytes(CHAR_TO_BYTE[c] for c in s)


def _bytes_to_hf_string(b):
    return "".join(BYTE_TO_CHAR[x] for x in b)


def _ranks_from_merges(merges):
    """Mergeable ranks for tiktoken from an ordered list of HF merge pairs [(a, b), ...] (HF strings)."""
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        token = _hf_string_to_bytes(a) + _hf_string_to_bytes(b)
        if token in ranks:
            raise ValueError(f"tokenizer merges: token {token!r} is produced twice")
        ranks[token] = len(ranks)
    return ranks


def _validate_ranks(ranks):
    # tiktoken panics (an uncatchable Rust abort) when a single byte is missing, so check first
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"tokenizer ranks are missing {len(missing)} single bytes (e.g. {missing[:5]})")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tokenizer ranks are not a dense range 0..N-1")


def _hf_pre_tokenizer(pattern=SPLIT_PATTERN):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _recover_merges(ranks):
    """Merge pairs for ranks that came without them (e.g. a foreign tiktoken file): for each token, the split
    into two lower-ranked tokens whose later half was created earliest."""
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = []
    for tok, rank in by_rank[256:]:
        # recover the pair: the split whose two halves are both lower-ranked tokens, lowest max rank first
        best = None
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks and ranks[left] < rank and ranks[right] < rank:
                key = max(ranks[left], ranks[right])
                if best is None or key < best[0]:
                    best = (key, left, right)
        if best is None:
            raise ValueError(f"tokenizer: no merge pair found for token {tok!r}")
        merges.append((_bytes_to_hf_string(best[1]), _bytes_to_hf_string(best[2])))
    return merges


def _hf_from_ranks(ranks, merges, pattern=SPLIT_PATTERN):
    """An HF tokenizer with exactly our ids (bytes by value, merges in order, specials last)."""
    vocab = {_bytes_to_hf_string(tok): rank for tok, rank in ranks.items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = _hf_pre_tokenizer(pattern)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIAL_TOKENS)
    return hf


# -----------------------------------------------------------------------------

def train_tokenizer(text_iterator, vocab_size):
    """Train a byte-level BPE on an iterator of strings; vocab_size counts bytes + merges + 9 specials."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {256 + len(SPECIAL_TOKENS) + 1}")
    hf = HFTokenizer(models.BPE(fuse_unk=False))
    hf.pre_tokenizer = _hf_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        # without the full byte alphabet unseen bytes would be silently dropped at encode time
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(text_iterator, trainer=trainer)
    state = json.loads(hf.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in state["model"]["merges"]]
    return Tokenizer(_ranks_from_merges(merges), merges=merges)


class Tokenizer:
    """tiktoken-backed encoder/decoder with the nanochat special tokens and chat rendering."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN, merges=None):
        _validate_ranks(mergeable_ranks)
        self.mergeable_ranks = mergeable_ranks
        self.merges = [tuple(m) for m in merges] if merges is not None else _recover_merges(mergeable_ranks)
        self.pattern = pattern
        n = len(mergeable_ranks)
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanorun", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # --- persistence ---------------------------------------------------------

    def save(self, directory):
        from nanochat.common import atomic_torch_save, atomic_write_bytes
        os.makedirs(directory, exist_ok=True)
        payload = {"pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks, "merges": self.merges,
                   "special_tokens": SPECIAL_TOKENS}
        atomic_write_bytes(os.path.join(directory, "tokenizer.json"), self.hf_tokenizer().to_str().encode())
        atomic_torch_save(self.token_bytes(), os.path.join(directory, "token_bytes.pt"))
        atomic_write_bytes(os.path.join(directory, "tokenizer.pkl"), pickle.dumps(payload))  # last: marks complete

    @classmethod
    def from_directory(cls, directory):
        path = os.path.join(directory, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer in {directory} (expected tokenizer.pkl; run the tok_train stage)")
        with open(path, "rb") as f:
            payload = pickle.load(f)
        if list(payload.get("special_tokens", [])) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: special tokens differ from this version's {SPECIAL_TOKENS}")
        return cls(payload["mergeable_ranks"], payload["pattern"], payload.get("merges"))

    def hf_tokenizer(self):
        """The equivalent `tokenizers.Tokenizer` (same ids); slow, for checks and export."""
        return _hf_from_ranks(self.mergeable_ranks, self.merges, self.pattern)

    # --- encode / decode -----------------------------------------------------

    def _special_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Ordinary encoding (special-token text is encoded as plain text). prepend/append: id or special name."""
        pre = [] if prepend is None else [self._special_id(prepend)]
        post = [] if append is None else [self._special_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [pre + row + post for row in rows]
        raise TypeError(f"encode: expected str or list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode([int(t) for t in ids])  # accepts lists, tensors and numpy arrays

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self.special_tokens[name]

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def token_bytes(self):
        """int32 tensor (vocab,): raw UTF-8 byte length of each token, 0 for specials (used by bpb)."""
        import torch
        n = len(self.mergeable_ranks)
        lengths = [len(self.enc.decode_single_token_bytes(i)) for i in range(n)] + [0] * len(SPECIAL_TOKENS)
        return torch.tensor(lengths, dtype=torch.int32)

    # --- chat rendering ------------------------------------------------------

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize a chat for SFT. Returns (ids, mask): mask 1 on tokens the assistant is trained to produce.
        conversation: {"messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}]}."""
        messages = list(conversation["messages"] if isinstance(conversation, dict) else conversation)
        if messages and messages[0]["role"] == "system":
            # no system slot in the format: fold it into the first user message
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("conversation: a system message must be followed by a user message")
            merged = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
            messages = [merged] + messages[2:]
        if not messages:
            raise ValueError("conversation: no messages")
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special_tokens
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"conversation: message {i} has role {message['role']!r}, expected {expected!r} "
                                 "(roles must alternate user/assistant)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"conversation: user message {i} content must be a string")
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":  # the model writes the tool call: supervised
                        add(sp["<|python_start|>"], 1)
                        add(self.encode(text), 1)
                        add(sp["<|python_end|>"], 1)
                    elif kind == "python_output":  # produced by the tool at inference: not supervised
                        add(sp["<|output_start|>"], 0)
                        add(self.encode(text), 0)
                        add(sp["<|output_end|>"], 0)
                    else:
                        raise ValueError(f"conversation: unknown content part type {kind!r} in message {i}")
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the final assistant turn: drop it, render, append <|assistant_start|>."""
        messages = list(conversation["messages"] if isinstance(conversation, dict) else conversation)
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion: the last message must be the assistant's")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=10**9)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def visualize(self, ids, mask):
        """Debug string: masked-in tokens in brackets."""
        return "".join(f"[{self.id_to_token(t)}]" if m else self.id_to_token(t) for t, m in zip(ids, mask))
