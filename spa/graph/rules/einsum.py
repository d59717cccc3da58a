"""Einsum: the equation names every axis, so one label is one channel space wherever it occurs.

A label kept in the output ties its axes in every operand to the output axis; a label summed
away is contracted (in one operand it is a sum like ReduceSum's: a removed channel, zeroed,
adds nothing, so both are exact). ``...`` is supported: its dims get labels aligned from the
right, as numpy broadcasts them. A label repeated within one term (a diagonal or trace) reads
channel i against channel i of another axis and blocks.
"""

from __future__ import annotations

from ..context import NodeContext
from .registry import rule

__all__ = ["parse_equation"]

ELLIPSIS = "..."


def _labels(term: str, rank: int | None, width: int) -> list[str] | str:
    """The term's labels; its ``...`` stands for ``rank - letters`` dims, the last ones of
    the ``width`` broadcast dims (labelled ``.0``, ``.1``, ..., which no letter can be)."""
    head, dots, tail = term.partition(ELLIPSIS)
    letters = head + tail
    if ELLIPSIS in tail or not all(c.isascii() and c.isalpha() for c in letters):
        return f"cannot read term {term!r}"
    if not dots:
        return list(letters) if rank in (None, len(letters)) else f"term {term!r} does not match rank {rank}"
    n = width if rank is None else rank - len(letters)
    if n < 0:
        return f"term {term!r} has more letters than rank {rank}"
    return list(head) + [f".{width - n + j}" for j in range(n)] + list(tail)


def parse_equation(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]] | str:
    """Each operand's and the output's axis labels, or why the equation cannot be read.

    >>> parse_equation("bi,oi", [2, 2])
    ([['b', 'i'], ['o', 'i']], ['b', 'o'])
    >>> parse_equation("...i,io->...o", [3, 2])
    ([['.0', '.1', 'i'], ['i', 'o']], ['.0', '.1', 'o'])
    """
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return f"{len(terms)} terms for {len(ranks)} inputs"
    width = max(r - len(t.replace(ELLIPSIS, "")) for t, r in zip(terms, ranks)) if ranks else 0
    inputs = [_labels(t, r, max(width, 0)) for t, r in zip(terms, ranks)]
    bad = next((x for x in inputs if isinstance(x, str)), None)
    if bad:
        return bad
    dots = [f".{j}" for j in range(max(width, 0))]
    if arrow:
        if ELLIPSIS not in rhs and dots:
            return "the output drops the dims of '...'"   # numpy and onnxruntime refuse it too
        output = _labels(rhs, None, len(dots))
        if isinstance(output, str):
            return output
    else:   # implicit: the broadcast dims, then the letters used once, sorted (numpy's order)
        counts: dict[str, int] = {}
        for term in inputs:
            for label in term:
                counts[label] = counts.get(label, 0) + 1
        output = dots + sorted(c for c, n in counts.items() if n == 1 and not c.startswith("."))
    return inputs, output


@rule("Einsum")
def einsum(ctx: NodeContext):
    equation = ctx.attr("equation", b"")
    equation = equation.decode() if isinstance(equation, bytes) else equation
    shapes = [ctx.in_shape(k) for k in range(len(ctx.node.input))]
    parsed = parse_equation(equation, [len(s) for s in shapes])
    if isinstance(parsed, str):
        return f"Einsum {ctx.name!r}: {parsed}"
    terms, out = parsed
    y = ctx.out_shape(0)
    if len(out) != len(y):
        return f"Einsum {ctx.name!r}: output rank {len(y)} does not match {equation!r}"
    for term in terms + [out]:
        if len(set(term)) < len(term):
            return f"Einsum {ctx.name!r}: a label repeats within one term of {equation!r} (diagonal)"
    where: dict[str, list[tuple[int, int]]] = {}
    for k, term in enumerate(terms):
        for axis, label in enumerate(term):
            where.setdefault(label, []).append((k, axis))
    if any(label not in where for label in out):
        return f"Einsum {ctx.name!r}: an output label of {equation!r} is in no input"
    # Size-1 dims broadcast against the label's size n: they are no channel, so they stay out
    # of the tie (left unmentioned, the registry fixes them as not-channel).
    full = {}
    for label, occurrences in where.items():
        n = max(shapes[k][axis] for k, axis in occurrences)
        if any(shapes[k][axis] not in (1, n) for k, axis in occurrences) or \
                (label in out and y[out.index(label)] != n):
            return f"Einsum {ctx.name!r}: the sizes of label {label!r} disagree"
        full[label] = [(k, axis) for k, axis in occurrences if shapes[k][axis] == n]

    for label, occurrences in full.items():
        spaces = [ctx.inp(k, axis) for k, axis in occurrences]
        if label in out:
            o = ctx.outp(0, out.index(label))
            for s in spaces:
                ctx.same(s, o)
            if len(occurrences) > 1:   # in several operands and the output: a batch axis (heads)
                ctx.batch(o)
        else:
            for s in spaces[1:]:
                ctx.same(spaces[0], s)
            # Zeroing the removed channels in one operand zeroes their terms of the sum.
            ctx.contract(*occurrences[0])
    return None
