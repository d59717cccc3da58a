"""``PruneResult``: the pruned model, the original it came from, the report and the plans."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .interop import to_graphsurgeon
from .loading.model import forget_files, has_external_data, materialized, save

__all__ = ["PruneResult", "file_bytes"]


@dataclass(repr=False)
class PruneResult:
    stored: onnx.ModelProto    # the pruned model as spa holds it: large weights in scratch or input files
    original: onnx.ModelProto
    report: dict = field(default_factory=dict)
    source: str | None = None
    files: dict = field(default_factory=dict)  # what the original was read from: never written
    plans: list = field(default_factory=list)  # the Plan of each pass, in order
    one_file: bool = False     # the input held its weights in its .onnx file: so does the result

    @property
    def model(self) -> onnx.ModelProto:
        """The pruned model. Where the input held its weights in its .onnx file, so does this
        one, read in when first asked for (``save`` writes them from where they lie instead)."""
        if self.one_file and has_external_data(self.stored):
            held = self.stored
            self.stored = materialized(held)
            forget_files(held)
        return self.stored

    @model.setter
    def model(self, value: onnx.ModelProto):
        self.stored = value

    def __repr__(self) -> str:
        """A few lines like the CLI's table, not the protobufs."""
        rep = self.report
        before, after = rep.get("before", {}), rep.get("after", {})
        lines = [f"PruneResult of {self.source or 'a model in memory'}:"]
        for key in ("params", "macs", "file_bytes"):
            if before.get(key) and after.get(key) is not None:
                lines.append(f"  {key:<10} {before[key]:>14,} -> {after[key]:>14,}  ({after[key] / before[key]:.3f})")
        groups = rep.get("groups", [])
        removed, total = sum(g["removed"] for g in groups), sum(g["channels"] for g in groups)
        lines.append(f"  removed {removed} of {total} channels in {sum(bool(g['removed']) for g in groups)} "
                     f"of {len(groups)} groups")
        verify = rep.get("verify")
        lines.append("  not verified" if not verify or "skipped" in verify else
                     f"  verified: max abs error {verify.get('max_abs_error', float('nan')):.2g}")
        return "\n".join(lines)

    __str__ = __repr__

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pruned model atomically; refuses to overwrite the input model or its
        external data."""
        written = save(self.stored, path, inputs=self.files, one_file=self.one_file or None)
        after = self.report.setdefault("after", {})
        after["file_bytes"] = sum(os.path.getsize(p) for p in written)
        after["files"] = [str(p) for p in written]
        return written[0]

    def save_plan(self, path: str | os.PathLike) -> list[Path]:
        """Write the plan file (JSON, and an ``.npz`` beside it when values changed): what
        this pruning changed per tensor of the original, for ``spa.torch.apply_plan``. See
        ``spa.plan.plan_file``."""
        from .loading.files import check_outputs
        from .plan.plan_file import write_plan
        path = Path(path)
        check_outputs({"--plan": path, "--plan arrays": path.with_name(path.name + ".npz")},
                      {k: Path(v) for k, v in self.files.items()})
        return write_plan(self, path)

    def to_graphsurgeon(self):
        """The pruned model as an ``onnx_graphsurgeon.Graph`` (extra ``graphsurgeon``)."""
        return to_graphsurgeon(self.model)


def file_bytes(files: dict) -> int:
    return sum(os.path.getsize(f) for f in files.values())


