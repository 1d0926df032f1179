"""Base forms of English words by their derivational suffixes.

A shopper writes "striped", "stripy", "dotted", "glittery", "printed", "patterned",
"woolly", "lacy" where the catalogue's labels say `Stripe`, `Dot`, `Glitter`,
`Front print`, `All over pattern`, `Wool`, `Lace`. :func:`base_forms` undoes the
common adjective and participle endings (-ed, -ing, -y, -ish) with English spelling
rules (a dropped final e, a doubled final consonant), so such a word can be compared
with the words of the catalogue's values. Plurals and possessives are already removed
by the lexical stemmer (polyrec.retrieve.lexical.stem).
"""
from __future__ import annotations

#: (suffix, shortest base it may leave)
SUFFIXES: tuple[tuple[str, int], ...] = (("ed", 3), ("ing", 3), ("y", 4), ("ish", 3))
VOWELS = frozenset("aeiou")


def base_forms(word: str) -> list[str]:
    """The words ``word`` may be derived from, most likely first; [] when it has no
    derivational ending. ``base_forms("striped") == ["strip", "stripe"]``,
    ``base_forms("dotted") == ["dott", "dot", "dotte"]``, ``base_forms("sparkly")``
    contains "sparkle"."""
    w = word.lower()
    out: list[str] = []
    for suffix, shortest in SUFFIXES:
        if not w.endswith(suffix) or len(w) - len(suffix) < 3:
            continue
        root = w[: -len(suffix)]
        forms = [root]
        if len(root) >= 2 and root[-1] == root[-2] and root[-1] not in VOWELS:
            forms.append(root[:-1])  # dotted -> dot, woolly -> wool
        if root[-1] not in VOWELS:
            forms.append(root + "e")  # striped -> stripe, sparkly -> sparkle, lacy -> lace
        if root.endswith("i"):
            forms.append(root[:-1] + "y")  # frilliest... -> frilly
        for f in forms:
            if len(f) >= shortest and f not in out and f != w:
                out.append(f)
    return out
