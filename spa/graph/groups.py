"""Groups: channels (atom classes) that live in the same set of spaces.

All channels of one conv's output share the same spaces, so they form one group; a concat
output holds channels of several groups. A group is prunable when its channels are free and
it owns at least one initializer (something to slice); a group whose channels are fixed is
reported as blocked, with the reason recorded by the rule, input/output or exclusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .context import NOT_CHANNEL, Space
from .dependency import Dependency

__all__ = ["Group", "find_groups"]


@dataclass
class Group:
    id: int
    channels: np.ndarray               # representative atom of each channel, sorted
    spaces: list[Space]                # every tensor axis (or virtual axis) the channels live in
    blocked: str | None = None
    kind: str = "channels"             # "channels" (conv channels, MLP neurons), "heads", "head-dims"
    _members: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return len(self.channels)

    def member(self, dep: Dependency, space: Space) -> tuple[np.ndarray, np.ndarray]:
        """Indices of this group's channels in ``space``, and which channel each one is."""
        if space not in self._members:
            atoms = dep.atoms(space)
            roots = dep.root[atoms]
            pos = np.searchsorted(self.channels, roots).clip(0, len(self.channels) - 1)
            hit = self.channels[pos] == roots
            self._members[space] = (np.nonzero(hit)[0], pos[hit])
        return self._members[space]


def find_groups(dep: Dependency) -> tuple[list[Group], list[Group]]:
    """Return (prunable groups, blocked groups); only groups that own initializers count."""
    n_classes = len(dep.class_spaces)
    cls_of_atom = np.repeat(np.arange(n_classes), dep.block_size)
    pairs = np.unique(dep.root * n_classes + cls_of_atom)
    roots, classes = pairs // n_classes, pairs % n_classes
    split = np.nonzero(np.diff(roots))[0] + 1
    by_key: dict[tuple, list[int]] = {}
    for r, cls in zip(np.split(roots, split), np.split(classes, split)):
        if len(r) == 0:
            continue
        key = tuple(cls.tolist())
        if not dep.initializer_classes.intersection(key):
            continue
        by_key.setdefault(key, []).append(int(r[0]))

    prunable, blocked = [], []
    for key, channel_roots in sorted(by_key.items(), key=lambda kv: min(kv[1])):
        channels = np.array(sorted(channel_roots), dtype=np.int64)
        spaces = [s for c in key for s in dep.class_spaces[c]]
        reasons = [dep.fixed_reason.get(int(r)) for r in channels]
        free = channels[[r is None for r in reasons]]
        fixed_reasons = sorted({r for r in reasons if r is not None})
        if len(free) > 1:
            kind = ("hidden" if dep.inexact.intersection(free.tolist()) else
                    "heads" if dep.head_classes.intersection(key) and dep.attention == "heads" else
                    "head-dims" if dep.head_dim_classes.intersection(key) and dep.attention == "head-dims" else
                    "channels")
            prunable.append(Group(len(prunable), free, spaces, kind=kind))
        fixed_reasons = [r for r in fixed_reasons if not r.startswith(NOT_CHANNEL)]
        if fixed_reasons and len(channels) > 1:
            fixed = channels[[r is not None for r in reasons]]
            blocked.append(Group(-1, fixed, spaces, blocked="; ".join(fixed_reasons[:3])))
    for i, g in enumerate(blocked):
        g.id = len(prunable) + i
    return prunable, blocked
