"""Deterministic offline synthetic corpus (plain text and chat) for tests and the offline demo.

Why: with no Hub access the pipeline still needs data a *small* teacher can actually learn, so that
distillation has a signal to transfer. Every sample comes from a few rule-based tasks (arithmetic,
counting, sequence patterns) and a fixed little "world" of made-up facts that is the same for every
seed, so the same question always has the same answer across the corpus.

Records have the JSON-lines shapes `training.preprocess` reads: `{"text": str}` or
`{"messages": [{"role": ..., "content": ...}, ...]}`.

    python -m training.synthetic --output data/synthetic_chat.jsonl --n 2000 --kind chat --seed 0
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from training.utils.errors import command
from training.utils.io import atomic_write_jsonl

KINDS = ("text", "chat", "mixed")
_WORLD_SEED = 20240917  # fixed: the facts must not change with the sample seed
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "zu", "pel", "dar", "ni", "sha", "qui", "bo", "fen"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_ANIMALS = ["cat", "dog", "owl", "fox", "horse", "rabbit", "goat", "whale"]
_JOBS = ["baker", "pilot", "teacher", "farmer", "painter", "doctor", "singer", "builder"]
_SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly and correctly.", "You are a careful tutor."]


@lru_cache(maxsize=1)
def _world() -> dict:
    """A fixed set of made-up countries (with capitals) and people (with attributes)."""
    rng = random.Random(_WORLD_SEED)

    def name(parts: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()

    countries: dict[str, str] = {}
    while len(countries) < 24:
        countries.setdefault(name(2), name(2))
    people: dict[str, dict[str, str]] = {}
    while len(people) < 24:
        people.setdefault(
            name(2), {"color": rng.choice(_COLORS), "animal": rng.choice(_ANIMALS), "job": rng.choice(_JOBS)}
        )
    return {"countries": countries, "people": people}


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(0, 50), rng.randrange(0, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} equals {a + b}."
    hi, lo = max(a, b), min(a, b)
    return f"What is {hi} minus {lo}?", f"{hi} minus {lo} is {hi - lo}.", f"{hi} minus {lo} equals {hi - lo}."


def _counting(rng: random.Random) -> tuple[str, str, str]:
    start, step, n = rng.randrange(0, 40), rng.choice([1, 2, 3, 5]), rng.randrange(4, 8)
    seq = " ".join(str(start + i * step) for i in range(n))
    return (
        f"Count {n} numbers from {start} in steps of {step}.",
        seq + ".",
        f"Counting from {start} by {step}: {seq}.",
    )


def _pattern(rng: random.Random) -> tuple[str, str, str]:
    unit = " ".join(rng.choice(_ANIMALS) for _ in range(rng.randrange(2, 4)))
    times = rng.randrange(2, 5)
    rep = ", ".join([unit] * times)
    return f"Repeat '{unit}' {times} times.", rep + ".", f"The pattern {unit} repeated {times} times is {rep}."


def _fact(rng: random.Random) -> tuple[str, str, str]:
    world = _world()
    if rng.random() < 0.5:
        country = rng.choice(sorted(world["countries"]))
        capital = world["countries"][country]
        answer = f"The capital of {country} is {capital}."
        return f"What is the capital of {country}?", answer, answer
    person = rng.choice(sorted(world["people"]))
    attr = rng.choice(["color", "animal", "job"])
    value = world["people"][person][attr]
    question = {
        "color": f"What is the favorite color of {person}?",
        "animal": f"Which animal does {person} keep?",
        "job": f"What is the job of {person}?",
    }[attr]
    answer = {
        "color": f"The favorite color of {person} is {value}.",
        "animal": f"{person} keeps a {value}.",
        "job": f"{person} works as a {value}.",
    }[attr]
    return question, answer, answer


_TASKS = (_arithmetic, _counting, _pattern, _fact)


def _text_record(rng: random.Random) -> dict:
    sentences = [rng.choice(_TASKS)(rng)[2] for _ in range(rng.randrange(2, 5))]
    return {"text": " ".join(sentences)}


def _chat_record(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    for _ in range(rng.randrange(1, 4)):
        question, answer, _ = rng.choice(_TASKS)(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def synthetic_corpus(n: int, seed: int = 0, kind: str = "text") -> list[dict]:
    """`n` records, identical for identical (n, seed, kind). kind: "text" -> {"text"}, "chat" ->
    {"messages"} (1-3 user/assistant turns, sometimes a system prompt), "mixed" -> both, alternating."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"hf-retnet-synthetic:{kind}:{seed}")
    out = []
    for i in range(n):
        chat = kind == "chat" or (kind == "mixed" and i % 2 == 1)
        out.append(_chat_record(rng) if chat else _text_record(rng))
    return out


def corpus_texts(records: Iterable[dict]) -> list[str]:
    """Flatten records to strings, e.g. to train a tiny tokenizer on the same distribution."""
    out = []
    for rec in records:
        if "text" in rec:
            out.append(rec["text"])
        else:
            out.extend(m["content"] for m in rec["messages"])
    return out


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> str:
    """Write records as JSON lines atomically (temp file in the same folder, then os.replace)."""
    atomic_write_jsonl(path, records)
    return os.fspath(path)


@dataclass
class SyntheticArguments:
    """`python -m training.synthetic`: every field is a flag and a YAML key."""

    output: str = field(metadata={"help": "JSONL file to write"})
    n: int = field(default=1000, metadata={"help": "number of records"})
    seed: int = field(default=0, metadata={"help": "sample seed (the world of facts is fixed)"})
    kind: str = field(default="chat", metadata={"choices": list(KINDS), "help": "text, chat or mixed"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(SyntheticArguments, prog="python -m training.synthetic",
                         description="Write a deterministic synthetic corpus (JSON lines) for offline tests and demos.")


@command
def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_or_exit(argv)
    write_jsonl(synthetic_corpus(args.n, args.seed, args.kind), args.output)
    print(f"wrote {args.n} {args.kind} records to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
