"""
Conversation sources for the SFT stage, and best-fit packing of rendered conversations into training rows.

Sources (all offline except chitchat, which pip-downloads one wheel on first use):
    identity_conversations(name, creator)   who the assistant is, from spec strings
    arithmetic_conversations(n, seed)       word problems solved with the calculator tool parts
    spelling_conversations(n, seed)         "How many r in strawberry?" solved with str.count, and spelling
    chitchat_conversations(path)            human-human chats (chitchat-dataset 0.9.0) as user/assistant turns

A conversation is {"messages": [{"role": "user"|"assistant", "content": str | [parts]}]} as
Tokenizer.render_conversation takes it. No eval test item is ever generated here (reference/data.md (c)).

    python -m nanochat.sft_data   # prints one example of every generated source
"""

import json
import os
import random
import subprocess
import sys
import zipfile

import torch

CHITCHAT = ("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl")

# -----------------------------------------------------------------------------
# (a) identity


IDENTITY_QA = [
    ("Who are you?", "I'm {name}, a small chat model built by {creator}."),
    ("What is your name?", "My name is {name}."),
    ("What's your name?", "I'm called {name}."),
    ("Who made you?", "I was made by {creator}."),
    ("Who created you?", "{creator} created me. I'm {name}."),
    ("Are you ChatGPT?", "No, I'm {name}, a small language model trained by {creator}."),
    ("Hi! Can you introduce yourself?", "Hello! I'm {name}, an assistant trained by {creator}. How can I help?"),
    ("What kind of model are you?",
     "I'm {name}, a small transformer language model, pretrained on text and then fine-tuned to chat by {creator}."),
    ("Can you use tools?", "Yes, I can use a small Python calculator for arithmetic and for counting letters."),
    ("Are you a person?", "No, I'm {name}, a computer program: a language model made by {creator}."),
    ("hello", "Hello! I'm {name}. What can I do for you today?"),
    ("Thanks for your help!", "You're welcome! I'm glad I could help."),
]


def identity_conversations(name="nanorun", creator="the nanorun authors"):
    """One single-turn conversation per template, plus a two-turn one for each adjacent pair."""
    qa = [(q, a.format(name=name, creator=creator)) for q, a in IDENTITY_QA]
    out = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]
    for (q1, a1), (q2, a2) in zip(qa, qa[1:]):
        out.append({"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                 {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]})
    return out


# -----------------------------------------------------------------------------
# (b) arithmetic word problems with the calculator tool

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia", "Noor"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "shells", "cards", "eggs"]
BOXES = ["boxes", "bags", "shelves", "jars", "baskets", "packs"]


def _arithmetic_problem(rng):
    """-> (question, expression, answer, explanation) with an integer answer."""
    who, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(BOXES)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return (f"{who} has {a} {item} and gets {b} more. How many {item} does {who} have now?",
                f"{a}+{b}", a + b, f"{who} starts with {a} {item} and gets {b} more, so we add them.")
    if kind == 1:
        a = rng.randint(20, 200)
        b = rng.randint(1, a - 1)
        return (f"{who} had {a} {item} and gave away {b}. How many {item} are left?",
                f"{a}-{b}", a - b, f"{who} gave away {b} of the {a} {item}, so we subtract.")
    if kind == 2:
        a, b = rng.randint(2, 40), rng.randint(2, 25)
        return (f"There are {a} {box} with {b} {item} in each. How many {item} are there in total?",
                f"{a}*{b}", a * b, f"Each of the {a} {box} holds {b} {item}, so we multiply.")
    b, q = rng.randint(2, 12), rng.randint(2, 30)
    return (f"{who} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?",
            f"{b * q}//{b}", q, f"{b * q} {item} are split into {b} equal parts, so we divide.")


def arithmetic_conversations(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, expr, answer, why = _arithmetic_problem(rng)
        parts = [{"type": "text", "text": why + " "},
                 {"type": "python", "text": expr},
                 {"type": "python_output", "text": str(answer)},
                 {"type": "text", "text": f" The answer is {answer}."}]
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]})
    return out


# -----------------------------------------------------------------------------
# (c) spelling and letter counting

WORDS = ("strawberry banana apple orange mississippi committee bookkeeper balloon letter coffee success "
         "programming language assistant tomato potato elephant giraffe kangaroo necessary address "
         "accommodate parallel occurrence rhythm pepper bubble puzzle cinnamon broccoli").split()


def spelling_conversations(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        if rng.random() < 0.7:  # counting through the tool
            letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            count = word.count(letter)
            question = rng.choice([f"How many {letter} are in {word}?", f"How many times does the letter "
                                   f"'{letter}' appear in the word '{word}'?", f"Count the {letter}s in {word}."])
            spelled = "-".join(word)
            parts = [{"type": "text", "text": f"The word '{word}' is spelled {spelled}. Let me count '{letter}': "},
                     {"type": "python", "text": f"'{word}'.count('{letter}')"},
                     {"type": "python_output", "text": str(count)},
                     {"type": "text", "text": f" There {'is' if count == 1 else 'are'} {count} '{letter}' in "
                                             f"'{word}'."}]
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        else:
            messages = [{"role": "user", "content": rng.choice([f"Spell the word {word}.", f"How do you spell {word}?"])},
                        {"role": "assistant", "content": f"{word} is spelled: {'-'.join(word)}."}]
        out.append({"messages": messages})
    return out


# -----------------------------------------------------------------------------
# (d) chitchat-dataset (human-human chats)


def fetch_chitchat(cache_dir):
    """Path of the chitchat-dataset wheel, pip-downloading it into cache_dir on first use."""
    name, version, filename = CHITCHAT
    path = os.path.join(cache_dir, filename)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}", "-d", cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(path):
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
        raise RuntimeError(f"could not fetch {name}=={version} from PyPI (pip download): {detail[0]}")
    return path


def chitchat_conversations(wheel_path, max_conversations=None):
    """Each chat's consecutive messages by one sender are one turn; the first sender plays the user,
    the other the assistant. A trailing user turn is dropped (the assistant must speak last)."""
    with zipfile.ZipFile(wheel_path) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    out = []
    for key in sorted(data):
        turns = []  # (sender, text)
        for group in data[key].get("messages", []):
            for msg in group:
                text, sender = str(msg.get("text", "")).strip(), msg.get("sender")
                if not text:
                    continue
                if turns and turns[-1][0] == sender:
                    turns[-1] = (sender, turns[-1][1] + "\n" + text)
                else:
                    turns.append((sender, text))
        if len(turns) % 2:
            turns = turns[:-1]
        if len(turns) < 2:
            continue
        roles = ("user", "assistant")
        out.append({"messages": [{"role": roles[i % 2], "content": t} for i, (_, t) in enumerate(turns)]})
        if max_conversations and len(out) >= max_conversations:
            break
    return out


# -----------------------------------------------------------------------------
# Packing


def pack_rows(rendered, row_len, bos_id):
    """Best-fit packing of rendered conversations [(ids, mask)] into rows of exactly row_len tokens.
    Conversations are taken in order into a window; each row repeatedly takes the longest one in the window
    that still fits, and is padded with BOS (mask 0) when none does: nothing is ever cropped (a conversation
    longer than a row must be truncated by the caller when rendering). -> list of (ids, mask) rows."""
    window, rows, nxt = [], [], 0
    buffer_size = 100
    while nxt < len(rendered) or window:
        while len(window) < buffer_size and nxt < len(rendered):
            ids, mask = rendered[nxt]
            if len(ids) > row_len:
                raise ValueError(f"pack_rows: conversation {nxt} has {len(ids)} tokens > row length {row_len}")
            window.append((ids, mask))
            nxt += 1
        ids, mask = [], []
        while True:
            room = row_len - len(ids)
            best = max((i for i in range(len(window)) if len(window[i][0]) <= room),
                       key=lambda i: len(window[i][0]), default=None)
            if best is None:
                break
            conv_ids, conv_mask = window.pop(best)
            ids += conv_ids
            mask += conv_mask
        pad = row_len - len(ids)
        rows.append((ids + [bos_id] * pad, mask + [0] * pad))
    return rows


def rows_to_batch(rows, device="cpu"):
    """rows of T+1 tokens -> (inputs int32 (B,T), targets int64 (B,T) with -1 where not supervised)."""
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    x = ids[:, :-1].to(torch.int32)
    y = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return x.to(device), y.to(device)


def main():
    for conv in (identity_conversations()[0], arithmetic_conversations(1)[0], spelling_conversations(1)[0]):
        print(json.dumps(conv, indent=1))


if __name__ == "__main__":
    main()
