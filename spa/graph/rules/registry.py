"""One axis rule per ONNX operator family.

A rule receives a :class:`NodeContext` and states how the axes of the node's inputs and
outputs are tied (``same``, ``offset``, ``product``), which it cannot allow to shrink
(``fix``/``mixing``), where channels are summed away (``contract``: the oracle zeroes them
there), and which of the node's size constants must follow the pruning (``sizes``,
``slice_bounds``: data the plan resolves, see ``fixups.py``). Any axis a
rule does not mention is fixed, so an incomplete rule is conservative, never wrong.
Operators without a rule fix every axis they touch, and the report names them.
"""

from __future__ import annotations

from typing import Callable


from ..context import NodeContext, Reason

__all__ = ["RULES", "rule", "apply_rule"]

RULES: dict[str, Callable[[NodeContext], None]] = {}


def rule(*op_types: str):
    def register(fn):
        for op in op_types:
            if op in RULES:
                raise ValueError(f"rule for {op} registered twice")
            RULES[op] = fn
        return fn
    return register


def apply_rule(ctx: NodeContext) -> str | None:
    """Run the node's rule; return why the node is blocked, or None."""
    node = ctx.node
    shapes_known = all(ctx.shape(n) is not None for n in list(node.input) + list(node.output) if n)
    key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    fn = RULES.get(key)
    if fn is None:
        reason = Reason(f"no rule for {(node.domain + '.') if node.domain else ''}{node.op_type} "
                        f"(node {ctx.name!r})", "no-rule", ctx.name, node.op_type)
    elif not shapes_known:
        reason = Reason(f"{node.op_type} {ctx.name!r}: tensor shapes unknown", "shapes-unknown", ctx.name,
                        node.op_type)
    else:
        reason = fn(ctx)
    if reason:
        ctx.fix_all(reason)
        return reason
    ctx.fix_unmentioned()
    return None


