"""Writing a benchmark's section of a markdown file in docs/, leaving the other sections alone."""
from __future__ import annotations

import re
from pathlib import Path

PERFORMANCE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def write_section(section: str, path: Path = PERFORMANCE) -> None:
    """Insert or replace the section of ``path`` whose heading is ``section``'s first line (a
    ``## `` heading), up to the next ``## `` heading; written atomically."""
    from graphprune.plan import atomic_write_text

    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Performance\n"
    body = section.rstrip("\n") + "\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text.rstrip("\n") + "\n")
