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
