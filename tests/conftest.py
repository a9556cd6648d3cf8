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


@pytest.fixture(scope="session")
def shared_variants(tmp_path_factory):
    """tests.variants.VariantCache: each optimized variant of the fixture detector built once per session, shared
    by the modules that need it (read-only: copy a folder before writing into it)."""
    from tests.variants import VariantCache

    return VariantCache(tmp_path_factory.mktemp("shared_variants"))


# Tests that need a built variant (the shared_variants fixture, directly or through another fixture) are slow: the
# first one of a session builds it (INT8 calibration, NNCF, OpenVINO conversion). Tests that build on their own
# carry @pytest.mark.slow. `make unit` leaves them out: -m "not slow and not integration".
SLOW_FIXTURES = {"shared_variants"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
