"""A built-in training corpus, made by the package itself: sentences drawn from a small
probabilistic grammar (no download, no one's text); and :class:`CharText`, any text with its
characters as the tokens.

The grammar has the structure a small language model can learn well beyond letter
frequencies: agreement of subject and verb (``the cat sleeps`` / ``the cats sleep``),
determiners that go with their nouns, nested prepositional phrases, and sums whose result is
fixed by their operands (``three plus four is seven.``).
"""

from __future__ import annotations

import random

import torch

__all__ = ["grammar_text", "CharText"]

_NOUNS = ["cat", "dog", "bird", "child", "farmer", "teacher", "robot", "river", "garden", "lamp", "horse", "baker"]
_PLURAL = {"child": "children"}
_ADJ = ["small", "old", "quiet", "bright", "green", "busy", "happy", "tired", "clever", "wooden"]
_VERBS_I = ["sleeps", "sings", "waits", "runs", "smiles", "rests"]  # intransitive, singular
_VERBS_T = ["sees", "likes", "follows", "finds", "watches", "helps"]  # transitive, singular
_PREP = ["near", "behind", "under", "beside", "across"]
_PLACES = ["the hill", "the old bridge", "the market", "the river", "the garden", "the quiet town"]
_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


def _verb_plural(verb: str) -> str:
    return verb[:-2] if verb.endswith("es") and verb[-3] in "sh" else verb[:-1]


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = rng.choice(_NOUNS)
    words = ["the" if rng.random() < 0.6 else ("some" if plural else "a")]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJ))
    words.append(_plural(noun) if plural else noun)
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.25:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{_NUM[a]} plus {_NUM[b]} is {_NUM[a + b]}."
    plural = rng.random() < 0.4
    subject = _noun_phrase(rng, plural)
    if r < 0.6:
        verb = rng.choice(_VERBS_I)
        rest = f"{_verb_plural(verb) if plural else verb}"
    else:
        verb = rng.choice(_VERBS_T)
        rest = f"{_verb_plural(verb) if plural else verb} {_noun_phrase(rng, rng.random() < 0.4)}"
    if rng.random() < 0.5:
        rest += f" {rng.choice(_PREP)} {rng.choice(_PLACES)}"
    return f"{subject} {rest}."


def grammar_text(sentences: int = 20000, seed: int = 0) -> str:
    """``sentences`` sentences of the grammar, one per line, reproducible from ``seed``."""
    rng = random.Random(seed)
    return "\n".join(_sentence(rng) for _ in range(sentences)) + "\n"


class CharText:
    """Characters as tokens: ``encode``/``decode`` and random training windows; the first 90%
    of ``text`` trains, the rest is held out."""

    def __init__(self, text: str, device: torch.device):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train, self.val = data[:cut].to(device), data[cut:].to(device)

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in s if c in self.index], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: torch.Tensor, batch: int, seq: int, g: torch.Generator):
        starts = torch.randint(0, len(split) - seq - 1, (batch,), generator=g).tolist()
        x = torch.stack([split[s:s + seq] for s in starts])
        y = torch.stack([split[s + 1:s + seq + 1] for s in starts])
        return x, y
