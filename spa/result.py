"""``PruneResult``: the pruned model, the original it came from, the report and the plans."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .interop import to_graphsurgeon
from .model import save

__all__ = ["PruneResult", "file_bytes"]


@dataclass
class PruneResult:
    model: onnx.ModelProto
    original: onnx.ModelProto
    report: dict = field(default_factory=dict)
    source: str | None = None
    files: dict = field(default_factory=dict)  # what the original was read from: never written
    plans: list = field(default_factory=list)  # the Plan of each pass, in order

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pruned model atomically; refuses to overwrite the input model or its
        external data."""
        written = save(self.model, path, inputs=self.files)
        after = self.report.setdefault("after", {})
        after["file_bytes"] = sum(os.path.getsize(p) for p in written)
        after["files"] = [str(p) for p in written]
        return written[0]

    def save_plan(self, path: str | os.PathLike) -> list[Path]:
        """Write the plan file (JSON, and an ``.npz`` beside it when values changed): what
        this pruning changed per tensor of the original, for ``spa.torch.apply_plan``. See
        ``spa.plan_file``."""
        from .files import check_outputs
        from .plan_file import write_plan
        path = Path(path)
        check_outputs({"--plan": path, "--plan arrays": path.with_name(path.name + ".npz")},
                      {k: Path(v) for k, v in self.files.items()})
        return write_plan(self, path)

    def to_graphsurgeon(self):
        """The pruned model as an ``onnx_graphsurgeon.Graph`` (extra ``graphsurgeon``)."""
        return to_graphsurgeon(self.model)


def file_bytes(files: dict) -> int:
    return sum(os.path.getsize(f) for f in files.values())


