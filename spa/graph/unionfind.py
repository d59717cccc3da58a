"""Union-find over channel atoms on numpy arrays (the engine of ``spa.graph.dependency``).

Atoms are integers; unions run over whole arrays of pairs, in bounded chunks, and each root
carries the reason (an id) of the earliest fix that reached its class. ``_PendingUnions``
batches the product stage's unions and applies them only where a block is read.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NO_REASON", "sorted_unique"]

NO_REASON = np.iinfo(np.int32).max  # reason id of an atom (class) that is free
_CHUNK = 1 << 16                    # atoms handled per numpy step: bounds temporaries


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's hash-based np.unique is several times slower on the
    millions of atom ids seen here)."""
    x = np.sort(x)
    if len(x) > 1:
        x = x[np.concatenate([[True], x[1:] != x[:-1]])]
    return x


class _UnionFind:
    """Union-find on numpy arrays. Union keeps the smaller atom as root; a root's reason is
    the smallest reason id (the earliest fix) of the atoms merged into it."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.reason = np.full(n, NO_REASON, dtype=np.int32)
        self.texts: list[str] = []
        self._ids: dict[str, int] = {}

    def reason_id(self, text: str) -> int:
        if text not in self._ids:
            self._ids[text] = len(self.texts)
            self.texts.append(text)
        return self._ids[text]

    def find(self, a: np.ndarray) -> np.ndarray:
        """Roots of atoms ``a`` (compressing their paths)."""
        p = self.parent
        r = p[a]
        while True:
            rr = p[r]
            if (rr == r).all():
                break
            r = rr
        p[a] = r
        return r

    def root_of(self, a: int) -> int:
        """Atom ``a``'s root (plain integers: one atom costs no arrays)."""
        p = self.parent
        while p[a] != a:
            a = int(p[a])
        return a

    def atom_fixed(self, a: int) -> bool:
        return self.reason[self.root_of(a)] != NO_REASON

    def _blocks(self, start: int, size: int):
        for s in range(start, start + size, _CHUNK):
            yield np.arange(s, min(s + _CHUNK, start + size))

    def fix_block(self, start: int, size: int, reason: str):
        rid = self.reason_id(reason)
        for a in self._blocks(start, size):
            r = self.find(a)
            r = r[self.reason[r] == NO_REASON]
            self.reason[r] = rid

    def block_fixed(self, start: int, size: int) -> bool:
        return any((self.reason[self.find(a)] != NO_REASON).any() for a in self._blocks(start, size))

    def block_all_fixed(self, start: int, size: int) -> bool:
        if size and not self.atom_fixed(start):   # most blocks are free: their first atom says so
            return False
        return all((self.reason[self.find(a)] != NO_REASON).all() for a in self._blocks(start, size))

    def block_reason(self, start: int, size: int) -> str | None:
        best = NO_REASON
        for a in self._blocks(start, size):
            best = min(best, int(self.reason[self.find(a)].min(initial=NO_REASON)))
        return None if best == NO_REASON else self.texts[best]

    def union(self, a: np.ndarray, b: np.ndarray):
        """Unite a[i] with b[i] for every i (one numpy pass per round of hooking)."""
        for s in range(0, len(a), _CHUNK):
            self._union(a[s:s + _CHUNK], b[s:s + _CHUNK])

    def _union(self, a: np.ndarray, b: np.ndarray):
        p, reason = self.parent, self.reason
        ra, rb = self.find(a), self.find(b)
        while True:
            m = ra != rb
            if not m.any():
                return
            ra, rb = ra[m], rb[m]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(p, hi, lo)          # every hi is a root: hook it under its smallest lo
            t = sorted_unique(np.concatenate([lo, hi]))
            while True:                       # parents of t lie in t: jump until all are roots
                pt = p[t]
                ppt = p[pt]
                if np.array_equal(ppt, pt):
                    break
                p[t] = ppt
            np.minimum.at(reason, pt, reason[t])
            ra, rb = p[ra], p[rb]

    def roots(self) -> np.ndarray:
        """Point every atom at its root, in place (parents precede children: chunk by chunk,
        the chunks before are already final)."""
        p = self.parent
        for s in range(0, len(p), _CHUNK):
            while True:
                q = p[p[s:s + _CHUNK]]
                if np.array_equal(q, p[s:s + _CHUNK]):
                    break
                p[s:s + _CHUNK] = q
        return p


class _PendingUnions:
    """The product stage's unions, applied together (one numpy pass per ``_CHUNK`` atoms,
    not a few per product). Applying them changes the parent and reason of no atom but the
    roots their atoms have now (``touched``), so a block none of whose roots is touched reads
    as it would with the unions applied; ``settle`` applies them before a block that is
    touched is read or fixed. Stating a union needs no settled roots."""

    def __init__(self, uf: _UnionFind):
        self.uf, self.a, self.b, self.count = uf, [], [], 0
        self.touched = np.zeros(len(uf.parent), dtype=bool)
        self.marked: list[np.ndarray] = []

    def add(self, a: np.ndarray, b: np.ndarray):
        for x in (a, b):
            r = self.uf.find(x)
            self.touched[r] = True
            self.marked.append(r)
        self.a.append(a)
        self.b.append(b)
        self.count += len(a)
        if self.count >= _CHUNK:
            self.flush()

    def atom_free(self, a: int) -> bool:
        """Whether atom ``a``'s root is free, the pending unions applied."""
        r = self.uf.root_of(a)
        if self.count and self.touched[r]:
            self.flush()
            r = self.uf.root_of(a)
        return self.uf.reason[r] == NO_REASON

    def settle(self, blocks):
        if self.count and any(self.touched[self.uf.find(a)].any() for start, size in blocks
                              for a in self.uf._blocks(start, size)):
            self.flush()

    def flush(self):
        if self.count:
            self.uf.union(np.concatenate(self.a), np.concatenate(self.b))
            for r in self.marked:
                self.touched[r] = False
            self.a, self.b, self.marked, self.count = [], [], [], 0
