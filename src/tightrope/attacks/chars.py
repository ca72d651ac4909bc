"""Character-level transformations of DeepWordBug (Gao et al. 2018, Sec. 3.2): swap two neighbouring
characters, substitute a character, delete a character, insert a character. As in TextAttack's
DeepWordBug recipe, each operation proposes one random edit per word (``random_one``), from a
seeded generator so that a fixed seed gives identical attacks.
"""

from __future__ import annotations

import string

from tightrope.attacks.words import Transformation

LETTERS = string.ascii_lowercase


def neighbour_swap(word: str, rng) -> str | None:
    if len(word) < 2:
        return None
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def substitute(word: str, rng) -> str | None:
    i = rng.randrange(len(word))
    return word[:i] + rng.choice(LETTERS) + word[i + 1:]


def delete(word: str, rng) -> str | None:
    if len(word) < 2:
        return None
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1:]


def insert(word: str, rng) -> str | None:
    i = rng.randrange(len(word) + 1)
    return word[:i] + rng.choice(LETTERS) + word[i:]


OPERATIONS = {"swap": neighbour_swap, "substitute": substitute, "delete": delete, "insert": insert}


class CharacterEdits(Transformation):
    """One random edit per operation for the word at ``index`` (DeepWordBug's four edits)."""

    name = "character_edits"

    def __init__(self, operations: tuple[str, ...] = ("swap", "substitute", "delete", "insert")):
        unknown = set(operations) - OPERATIONS.keys()
        if unknown:
            raise ValueError(f"unknown character operations {sorted(unknown)}")
        self.operations = tuple(operations)

    def params(self):
        return {"operations": list(self.operations), "per_operation": 1}

    def candidates(self, text, index, rng, *, label=None):
        word = text.words[index]
        out = []
        for op in self.operations:
            new = OPERATIONS[op](word, rng)
            if new and new != word and new not in out:
                out.append(new)
        return out
