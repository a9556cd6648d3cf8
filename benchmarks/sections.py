"""A benchmark's own section of BENCHMARKS.md, between its two marker comments: replaced in place, or appended
with its markers when missing; written atomically (a temporary file renamed over it), so a benchmark that reads
the file while another writes its own section never sees it half-written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_section(path: Path, begin: str, end: str, body: str) -> None:
    """`body` is the section's text without the markers."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.strip(chr(10))}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
