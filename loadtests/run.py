"""`python -m loadtests.run ...` is `edgestack load ...` (edgestack/load.py runs locust on loadtests/locustfile.py)."""
from __future__ import annotations

import sys
from typing import Sequence

from edgestack.cli import main as edgestack_main


def main(argv: Sequence[str] | None = None) -> int:
    return edgestack_main(["load", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
