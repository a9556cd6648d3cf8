"""What several edgestack commands read: the default pipeline spec, and the photos of an --images folder.

No default points outside the project: the photos are always named (`make demo` passes the fixture photos).
"""
from __future__ import annotations

from pathlib import Path

from backends.common import files
from edgestack.errors import EdgestackError

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "specs" / "centernet_coco.yaml"


def image_folder(folder: str | Path) -> list[Path]:
    """The image files of a folder named on the command line, sorted by name; EdgestackError when there are none."""
    return files.image_folder(Path(folder), EdgestackError)
