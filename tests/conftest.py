"""Shared test fixtures: the read-only fixture photos and detector beside the project."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = (ROOT.parent / "shared" / "fixtures").resolve()
IMAGES = FIXTURES / "images"
MODEL = FIXTURES / "models" / "centernet_mb3_coco.onnx"
SPEC = ROOT / "specs" / "centernet_coco.yaml"


@pytest.fixture(scope="session")
def fixture_images() -> Path:
    if not IMAGES.is_dir():
        pytest.fail(f"fixture photos missing at {IMAGES}: the project expects ../shared/fixtures beside it")
    return IMAGES
