"""
Generated arithmetic word problems for the RL stage (and the SFT mixture): GSM8K-style short stories with an
integer answer, solved in 2 steps with calculator spans and ending in "#### N", exactly like a GSM8K solution.
A problem is the same conversation item tasks.load_gsm8k returns: {"messages": [user, assistant parts],
"answer": "N", "task": "WordProblems"}, so one answer checker serves both (tasks.gsm8k_extract_answer).

Splits are disjoint by construction: a question belongs to "test" when the first 32 bits of its sha256 are
0 mod 10 (about 10% of all questions), else to "train"; each split only keeps its own questions. No GSM8K item
is ever produced (the stories come from the templates below).

    from nanochat.rl_data import word_problems, reward
    train = word_problems("train", 7473)          # deterministic for a given (split, n, seed)
    reward(train[0], "... #### 42")               # 1.0 when the final number is the gold answer, else 0.0
    python -m nanochat.rl_data                    # prints a few problems of each split
"""

import hashlib
import json
import random

from nanochat.tasks import gsm8k_extract_answer, gsm8k_parts

NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Priya", "Kenji", "Lucia", "Tariq", "Elena", "Sam", "Aisha",
         "Marco", "Yuki", "Ruth", "Diego", "Nadia", "Felix", "Grace"]
ITEMS = ["apples", "stickers", "marbles", "cupcakes", "pencils", "seashells", "cards", "beads", "crayons", "stamps"]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets", "crates"]
THINGS = ["notebooks", "toy cars", "tickets", "muffins", "plants", "comic books", "sandwiches", "candles"]
SPLITS = ("train", "test")


def _story(rng):
    """One problem -> (question, GSM8K-style solution with <<expr=result>> spans and '#### N', answer int)."""
    who, other = rng.sample(NAMES, 2)
    item, box, thing = rng.choice(ITEMS), rng.choice(CONTAINERS), rng.choice(THINGS)
    kind = rng.randrange(6)
    if kind == 0:   # has some, buys containers of more
        a, b, c = rng.randint(3, 60), rng.randint(2, 9), rng.randint(3, 15)
        x = b * c
        q = f"{who} has {a} {item}. {who} buys {b} {box} with {c} {item} in each. How many {item} does {who} have now?"
        s = (f"The {b} {box} hold {b}*{c} = <<{b}*{c}={x}>>{x} {item}.\n"
             f"{who} now has {a}+{x} = <<{a}+{x}={a + x}>>{a + x} {item}.")
        return q, s, a + x
    if kind == 1:   # gives some away, shares the rest equally
        b, c, per = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
        a = b + c * per
        q = (f"{who} had {a} {item} and gave {b} of them to {other}. {who} then put the rest into {c} {box} "
             f"with the same number in each. How many {item} are in each of the {box}?")
        s = (f"After giving {b} away, {who} had {a}-{b} = <<{a}-{b}={a - b}>>{a - b} {item}.\n"
             f"Each of the {c} {box} gets {a - b}/{c} = <<{a - b}//{c}={per}>>{per} {item}.")
        return q, s, per
    if kind == 2:   # buying at a price, change from a bill
        n, price = rng.randint(2, 9), rng.randint(2, 15)
        cost = n * price
        bill = next(v for v in (20, 50, 100, 200) if v >= cost)
        q = (f"{who} buys {n} {thing} that cost ${price} each and pays with a ${bill} bill. How much change does "
             f"{who} get?")
        s = (f"The {thing} cost {n}*{price} = <<{n}*{price}={cost}>>{cost} dollars.\n"
             f"The change is {bill}-{cost} = <<{bill}-{cost}={bill - cost}>>{bill - cost} dollars.")
        return q, s, bill - cost
    if kind == 3:   # reading a book for some days
        p, d = rng.randint(5, 30), rng.randint(2, 9)
        read = p * d
        total = read + rng.randint(10, 200)
        q = (f"{who} reads {p} pages every day. The book has {total} pages. How many pages are left to read "
             f"after {d} days?")
        s = (f"In {d} days {who} reads {p}*{d} = <<{p}*{d}={read}>>{read} pages.\n"
             f"There are {total}-{read} = <<{total}-{read}={total - read}>>{total - read} pages left.")
        return q, s, total - read
    if kind == 4:   # k times as many, together
        a, k = rng.randint(3, 40), rng.randint(2, 6)
        x = a * k
        q = (f"{who} has {a} {item}. {other} has {k} times as many {item} as {who}. How many {item} do they have "
             f"together?")
        s = (f"{other} has {a}*{k} = <<{a}*{k}={x}>>{x} {item}.\n"
             f"Together they have {a}+{x} = <<{a}+{x}={a + x}>>{a + x} {item}.")
        return q, s, a + x
    w, h, d = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)   # hourly pay over days
    day = w * h
    q = f"{who} earns ${w} an hour and works {h} hours a day. How much does {who} earn in {d} days?"
    s = (f"In one day {who} earns {w}*{h} = <<{w}*{h}={day}>>{day} dollars.\n"
         f"In {d} days that is {day}*{d} = <<{day}*{d}={day * d}>>{day * d} dollars.")
    return q, s, day * d


def split_of(question):
    """'test' for about 10% of all questions (by content hash), 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big")
    return "test" if h % 10 == 0 else "train"


def make_item(question, solution, answer):
    """A GSM8K-shaped conversation item (the calculator spans become python / python_output parts)."""
    text = f"{solution}\n#### {answer}"
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": gsm8k_parts(text)}],
            "answer": str(answer), "task": "WordProblems"}


def word_problems(split, n, seed=0):
    """The first n distinct problems of a split, in generation order (deterministic in split, n, seed;
    a smaller n is a prefix of a larger one)."""
    if split not in SPLITS:
        raise ValueError(f"word_problems: split {split!r}, expected one of {SPLITS}")
    rng = random.Random(f"nanorun-word-problems/{split}/{seed}")
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"word_problems: could not generate {n} distinct {split} problems")
        question, solution, answer = _story(rng)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        out.append(make_item(question, solution, answer))
    return out


def extract_answer(text):
    """The final number after '#### ' (commas removed), or None: the GSM8K checker's rule."""
    return gsm8k_extract_answer(text)


def reward(item, completion):
    """1.0 when the completion's '#### N' equals the item's answer exactly (as strings), else 0.0."""
    predicted = extract_answer(completion)
    return float(predicted is not None and predicted == item["answer"])


def main():
    for split in SPLITS:
        for item in word_problems(split, 2):
            print(split, json.dumps(item, indent=1))


if __name__ == "__main__":
    main()
