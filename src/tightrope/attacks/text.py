"""An immutable text split into words, so that a word can be replaced without re-tokenizing the rest.

``text == seps[0] + words[0] + seps[1] + words[1] + ... + seps[n]``: replacing ``words[i]`` keeps every
other character, and word indices stay stable across substitutions (as TextAttack's AttackedText).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# WORD: a word is letters or digits, with inner apostrophes or hyphens ("don't", "well-made")
from tightrope.transforms import WORD


@dataclass(frozen=True)
class AttackedText:
    words: tuple[str, ...]
    seps: tuple[str, ...]
    modified: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_text(cls, text: str) -> "AttackedText":
        words, seps, end = [], [], 0
        for m in WORD.finditer(text):
            seps.append(text[end:m.start()])
            words.append(m.group())
            end = m.end()
        seps.append(text[end:])
        return cls(tuple(words), tuple(seps))

    @property
    def text(self) -> str:
        parts = [self.seps[0]]
        for word, sep in zip(self.words, self.seps[1:]):
            parts += [word, sep]
        return "".join(parts)

    def __len__(self) -> int:
        return len(self.words)

    def replace(self, index: int, word: str) -> "AttackedText":
        """A new text with ``words[index]`` replaced; the index is marked modified."""
        words = list(self.words)
        words[index] = word
        return AttackedText(tuple(words), self.seps, self.modified | {index})

    def window(self, index: int, size: int) -> str:
        """The ``size`` words around ``index`` (TextFooler compares sentence meaning in such a window)."""
        half = size // 2
        start = max(0, min(index - half, len(self.words) - size))
        return " ".join(self.words[start:start + size])

    def spans(self) -> list[tuple[int, int]]:
        """Character (start, end) of each word in ``text``."""
        out, pos = [], len(self.seps[0])
        for word, sep in zip(self.words, self.seps[1:]):
            out.append((pos, pos + len(word)))
            pos += len(word) + len(sep)
        return out

    def diff(self, other: "AttackedText") -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.words, other.words)) if a != b]


def word_tokens(text: AttackedText, spans: list) -> dict[int, list[int]]:
    """For each word index of ``text``, the token positions whose span overlaps the word."""
    bounds = text.spans()
    out: dict[int, list[int]] = {}
    w = 0
    order = sorted((s[0], s[1], t) for t, s in enumerate(spans) if s is not None and s[1] > s[0])
    for a, b, t in order:  # tokens in text order (head+tail keeps text order too)
        while w < len(bounds) and bounds[w][1] <= a:
            w += 1
        if w < len(bounds) and bounds[w][0] < b and a < bounds[w][1]:
            out.setdefault(w, []).append(t)
    return out


class Part:
    """A part of an attack (a constraint, a transformation, a search) that names itself and its settings,
    so every result records the exact attack that produced it (TextAttack's ``extra_repr_keys``)."""

    name = "part"

    def params(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {"name": self.name, **self.params()}
