"""Groups: channels (atom classes) that live in the same set of spaces.

All channels of one conv's output share the same spaces, so they form one group; a concat
output holds channels of several groups. A group is prunable when its channels are free and
it owns at least one initializer (something to slice); a group whose channels are fixed is
reported as blocked, with the reason recorded by the rule, input/output or exclusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .context import NOT_CHANNEL, Reason, Space
from .dependency import _CHUNK, NO_REASON, Dependency, sorted_unique

__all__ = ["Group", "find_groups"]


@dataclass
class Group:
    id: int
    channels: np.ndarray               # representative atom of each channel, sorted
    spaces: list[Space]                # every tensor axis (or virtual axis) the channels live in
    blocked: str | None = None
    kind: str = "channels"             # "channels" (conv channels, MLP neurons), "heads", "head-dims",
                                       # "group-width" (the same positions of every conv group), "hidden"
    reasons: list[dict] = field(default_factory=list)  # blocked: {"node", "op", "reason"} each
    width: int = 1                     # weight channels per channel of the group: a GroupNorm
                                       # group of C/G conv filters is one channel (see _width)
    _members: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return len(self.channels)

    def member(self, dep: Dependency, space: Space) -> tuple[np.ndarray, np.ndarray]:
        """Indices of this group's channels in ``space``, and which channel each one is."""
        c = dep.space_class[space]      # spaces of one class share their atoms: cache per class
        if c not in self._members:
            roots = dep.root[dep.block_start[c]:dep.block_start[c] + dep.block_size[c]]
            pos = np.searchsorted(self.channels, roots).clip(0, len(self.channels) - 1)
            hit = self.channels[pos] == roots
            del roots
            self._members[c] = (np.nonzero(hit)[0], pos[hit])
        return self._members[c]


def _atom_classes(starts: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """The class of each atom (blocks are contiguous, in class order; an empty class shares
    its start with the next one, which owns the atom)."""
    return np.searchsorted(starts, atoms, side="right") - 1


def _class_sets(dep: Dependency):
    """Every representative atom, grouped by the sorted set of classes its channel lives in:
    (the class sets, the sorted representatives of each set).

    Most representatives have no other atom in another class (a conv's channels, a wide MLP
    hidden layer): their set is their own class. Only atoms that are not their own root
    (offset/product unions) make (root, class) pairs, grouped exactly. Atoms are read in
    chunks of ``_CHUNK`` across classes, never a numpy call per class."""
    n_classes = len(dep.class_spaces)
    starts, sizes, root = dep.block_start, dep.block_size, dep.root
    live = sizes > 0
    live[sorted(dep.collapsed)] = False
    n_atoms = len(root)

    # (root, class) of atoms that are not their own root, in another class than the root's
    keys = []
    for s0 in range(0, n_atoms, _CHUNK):
        a = np.arange(s0, min(s0 + _CHUNK, n_atoms))
        r, c = root[a], _atom_classes(starts, a)
        moved = (r != a) & live[c]
        moved[moved] = _atom_classes(starts, r[moved]) != c[moved]
        if moved.any():
            keys.append(sorted_unique(r[moved] * n_classes + c[moved]))
    keys = sorted_unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    multi_roots = keys // n_classes
    multi = sorted_unique(multi_roots)
    sets: dict[tuple, list[np.ndarray]] = {}
    if len(multi):
        # each multi root's own class joins its pairs; runs are sorted by root then class
        own = np.searchsorted(starts, multi, side="right") - 1
        keys = np.sort(np.concatenate([keys, multi * n_classes + own]))
        roots, classes = keys // n_classes, keys % n_classes
        del keys
        first = np.flatnonzero(np.concatenate([[True], roots[1:] != roots[:-1]]))
        bounds = np.append(first, len(roots))
        by_set: dict[tuple, list[int]] = {}   # few: one per channel tied across classes
        for i, f in enumerate(first.tolist()):
            by_set.setdefault(tuple(classes[f:bounds[i + 1]].tolist()), []).append(int(roots[f]))
        for key, rs in by_set.items():
            sets.setdefault(key, []).append(np.array(rs, dtype=np.int64))
    # every other root lives in its own class only
    own_roots, own_classes = [], []
    for s0 in range(0, n_atoms, _CHUNK):
        a = np.arange(s0, min(s0 + _CHUNK, n_atoms))
        c = _atom_classes(starts, a)
        mine = (root[a] == a) & live[c]
        if len(multi):
            at = np.searchsorted(multi, a).clip(0, len(multi) - 1)
            mine &= multi[at] != a
        own_roots.append(a[mine])
        own_classes.append(c[mine])
    if own_roots:
        atoms, classes = np.concatenate(own_roots), np.concatenate(own_classes)
        del own_roots, own_classes
        cut = np.flatnonzero(classes[1:] != classes[:-1]) + 1
        for c, mine in zip(classes[np.concatenate([[0], cut])].tolist() if len(atoms) else [],
                           np.split(atoms, cut)):
            sets.setdefault((c,), []).append(mine)
    keys = list(sets)
    return keys, [v[0] if len(v) == 1 else np.sort(np.concatenate(v)) for v in sets.values()]


def _typed(reason: str) -> dict:
    """{"kind", "node", "op", "reason"}: as the rule or stage typed it where it was stated."""
    if isinstance(reason, Reason):
        return reason.as_dict()
    return {"kind": None, "node": None, "op": None, "reason": str(reason)}   # a hand-built dependency


def _not_channel_reasons(dep: Dependency, key, unmapped: dict, constants: set[str],
                         ranks: dict[str, int]) -> list[str]:
    """Readable reasons for the activation axes of these classes that a rule left unmapped
    (a conv's channels read by DepthToSpace, Gather, Pad or Tile on that axis). Axes of
    constant tensors (kernel axes of weights) and of size vectors are not channels: skipped."""
    out = set()
    for c in key:
        for space in dep.class_spaces[c]:
            for reason in unmapped.get(space, ()):
                if space[0] not in constants and ranks.get(space[0], 0) >= 2:
                    out.add(Reason(f"{reason[len(NOT_CHANNEL):]} does not treat this axis as channels", "not-channel",
                                   getattr(reason, "node", None), getattr(reason, "op", None)))
    return sorted(out)


def _fixed_by_space(dep: Dependency) -> dict:
    table: dict = {}
    for space, reason in dep.couplings.fixed:
        if reason.startswith(NOT_CHANNEL):
            table.setdefault(space, []).append(reason)
    return table


def _width(dep: Dependency, group: Group) -> int:
    """How many indices one channel of ``group`` spans in its weights: the fewest over its
    initializer axes of rank >= 2 (conv kernels, matrices; not the 1-D biases and norm scales,
    which a per-group GroupNorm scale would make 1). 1 for a plain conv channel or neuron; C/G
    when GroupNorm ties the C/G filters of a group into one channel. Rounding to hardware
    widths counts these weight channels (``spa.plan.planner.round_unit``)."""
    inits = dep.view.inits if dep.view is not None else {}
    width = None
    for space in group.spaces:
        init = inits.get(space[0])
        if init is None or len(init.dims) < 2:
            continue
        c = dep.space_class[space]
        if dep.block_size[c] == group.size and c not in dep.collapsed:   # its own class: one atom each
            atoms = dep.root[dep.block_start[c]:dep.block_start[c] + group.size]
            if (atoms == group.channels).all():
                return 1
        idx, which = group.member(dep, space)
        if len(idx):
            w = len(idx) // len(sorted_unique(which))
            width = w if width is None else min(width, w)
            if width == 1:
                break
    return width or 1


def _free(channels: np.ndarray, reason_ids: np.ndarray, free_id: int, texts) -> tuple[np.ndarray | None, list]:
    """Which channels are free (None: every one, the common case, read in one step) and the
    sorted reasons that fix the others."""
    if len(channels) <= _CHUNK and (reason_ids[channels] == free_id).all():
        return None, []
    is_free = np.empty(len(channels), dtype=bool)
    seen: set[int] = set()
    for s in range(0, len(channels), _CHUNK):      # chunked: no full-width temporaries
        ids = reason_ids[channels[s:s + _CHUNK]]
        is_free[s:s + _CHUNK] = ids == free_id
        seen.update(sorted_unique(ids).tolist())
    seen.discard(free_id)
    return is_free, sorted({texts[i] for i in seen})


def find_groups(dep: Dependency, constants: set[str] | None = None) -> tuple[list[Group], list[Group]]:
    """Return (prunable groups, blocked groups); only groups that own initializers count.

    ``constants`` (tensors known before running: initializers and what is computed from them
    only) lets a group whose activation channels a rule leaves unmapped be reported as
    blocked (without it such groups stay silent, as for a hand-built dependency)."""
    sets, members = _class_sets(dep)
    found = [(key, channels) for key, channels in zip(sets, members)
             if dep.initializer_classes.intersection(key)]
    found.sort(key=lambda kv: int(kv[1][0]))
    inexact = np.array(sorted(dep.inexact), dtype=np.int64)
    reason_ids = dep.reason_ids
    if reason_ids is None:   # a Dependency built by hand, with a dict of reasons
        reason_ids = np.full(len(dep.root), -1, dtype=np.int64)
        texts = sorted(set(dep.fixed_reason.values()))
        for r, text in dep.fixed_reason.items():
            reason_ids[r] = texts.index(text)
        free_id = -1
    else:
        texts, free_id = dep.reasons, NO_REASON
    ranks: dict[str, int] = {}
    unmapped: dict = {}

    prunable, blocked = [], []
    for key, channels in found:
        channels = channels.astype(np.int64, copy=False)
        is_free, fixed_reasons = _free(channels, reason_ids, free_id, texts)
        n_free = len(channels) if is_free is None else int(is_free.sum())
        free = channels if n_free == len(channels) else channels[is_free]
        if len(free) > 1:
            kind = ("hidden" if len(inexact) and np.isin(free, inexact).any() else
                    "heads" if dep.head_classes.intersection(key) and dep.attention == "heads" else
                    "head-dims" if dep.head_dim_classes.intersection(key) and dep.attention == "head-dims" else
                    "group-width" if dep.group_width_classes.intersection(key) else
                    "channels")
            group = Group(len(prunable), free, [s for c in key for s in dep.class_spaces[c]], kind=kind)
            group.width = _width(dep, group)
            prunable.append(group)
        del free
        not_channel = any(r.startswith(NOT_CHANNEL) for r in fixed_reasons)
        fixed_reasons = [r for r in fixed_reasons if not r.startswith(NOT_CHANNEL)]
        if not_channel and constants is not None and len(channels) > 1:
            if not ranks:   # read once, when a group first needs them
                unmapped = _fixed_by_space(dep)
                for tensor, axis in dep.couplings.sizes:
                    ranks[tensor] = max(ranks.get(tensor, 0), axis + 1)
            fixed_reasons += _not_channel_reasons(dep, key, unmapped, constants, ranks)
        if fixed_reasons and len(channels) > 1:
            spaces = [s for c in key for s in dep.class_spaces[c]]
            fixed = channels if n_free == 0 else channels[~is_free]
            shown = fixed_reasons[:3]
            blocked.append(Group(-1, fixed, spaces, blocked="; ".join(shown),
                                 reasons=[_typed(r) for r in shown]))
    for i, g in enumerate(blocked):
        g.id = len(prunable) + i
    return prunable, blocked

