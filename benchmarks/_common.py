"""What the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def update_readme_section(text: str, readme: Path = README):
    """Replace the section of benchmarks/README.md that starts with ``text``'s first line
    (a ``## `` heading) up to the next ``## `` heading, or append it."""
    heading = text.lstrip().splitlines()[0]
    body = readme.read_text()
    start = body.find(heading)
    if start >= 0:
        end = body.find("\n## ", start + 3)
        body = body[:start] + text.rstrip() + "\n" + (body[end:] if end >= 0 else "")
    else:
        body = body.rstrip() + "\n\n" + text.rstrip() + "\n"
    readme.write_text(body)


def append_row(results: Path, row: dict):
    """Print one result row and append it to a .jsonl file (runs resume from what is there)."""
    import json
    print(json.dumps(row), flush=True)
    results.parent.mkdir(exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")


def render_results(results: Path, render) -> str:
    """Redraw a section from every row in ``results``: print it and put it in the README."""
    text = render(load_rows(results))
    print(text)
    update_readme_section(text)
    return text


def load_rows(results: Path) -> list[dict]:
    import json
    return [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.exists() else []


def blocking_op(blocked: dict) -> str | None:
    """The op type that left a blocked group (or node) whole, from the report's typed reasons."""
    if blocked.get("op"):
        return blocked["op"]
    return next((r["op"] for r in blocked.get("reasons", []) if r.get("op")), None)


def blocked_by_graph_io_only(blocked: dict) -> bool:
    """Whether only the graph's inputs/outputs keep this group whole (typed reasons name no node)."""
    reasons = blocked.get("reasons")
    return reasons is not None and not any(r.get("node") for r in reasons)


def update_readme_markers(tag: str, heading: str, text: str, readme: Path = README):
    """Replace what lies between ``<!-- tag:start -->`` and ``<!-- tag:end -->`` in
    benchmarks/README.md with ``text``; without the markers, append ``heading`` and them."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    body = readme.read_text()
    i, j = body.find(start), body.find(end)
    if i >= 0 and j > i:
        body = body[:i + len(start)] + "\n" + text.rstrip() + "\n" + body[j:]
    else:
        body = body.rstrip() + f"\n\n{heading}\n\n{start}\n{text.rstrip()}\n{end}\n"
    readme.write_text(body)


def interleaved_latency(original, pruned, shapes: dict, budget_s: float, least: int, most: int,
                        probe_factor: float = 2.0) -> dict:
    """Latency of original vs pruned, interleaved on one thread: one probe run of the original
    sizes the loop to about ``budget_s`` (between ``least`` and ``most`` runs). Errors are
    returned, not raised: a benchmark row records them."""
    import spa.verify.bench
    try:
        probe = spa.verify.bench.latency([original], shapes, runs=3, warmup=1, threads=1)[0]
        runs = int(max(least, min(most, budget_s / max(probe * probe_factor, 1e-6))))
        lo, lp = spa.verify.bench.latency([original, pruned], shapes, runs=runs, threads=1)
        return {"original_s": lo, "pruned_s": lp, "ratio": lp / lo, "runs": runs}
    except BaseException as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
