"""Shared test fixtures: the read-only fixture photos and detector beside the project."""
import os
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
    by the modules that need it (read-only: copy a folder before writing into it). Under pytest-xdist the folder is
    the run's, above the workers' own, so the workers share the builds too."""
    from tests.variants import VariantCache

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "shared_variants"
        root.mkdir(exist_ok=True)
        return VariantCache(root)
    return VariantCache(tmp_path_factory.mktemp("shared_variants"))


# Tests that need a built variant (the shared_variants fixture, directly or through another fixture) are slow: the
# first one of a session builds it (INT8 calibration, NNCF, OpenVINO conversion). Tests that build on their own
# carry @pytest.mark.slow. `make unit` leaves them out: -m "not slow and not integration".
SLOW_FIXTURES = {"shared_variants"}


# `make test` runs three pytest-xdist workers with --dist loadgroup: tests of one xdist_group run on one worker, so a
# server shared through a fixture starts once. Tests using a shared server fixture are grouped by that server; the
# modules that use shared variants form one group, so the builds run one after another on one worker instead of
# one worker waiting for the other's build (tests/variants.py); other tests using a module-scoped fixture are
# grouped by module; the rest go to whichever worker is free. Groups are handed out in collection order
# (--no-loadscope-reorder): the longest (variants, then the sidecar servers', minutes each) are collected first and
# the single tests last, to fill in.
SERVER_GROUPS = {"sidecar_env": "sidecar_synthetic", "fixture_sidecar_env": "sidecar_fixture",
                 "edge_server": "edge_server"}
VARIANTS_GROUP = "shared_variants"
GROUP_ORDER = [VARIANTS_GROUP, *SERVER_GROUPS.values()]


def xdist_group(item: pytest.Item, variant_modules: set[str]) -> str | None:
    names = set(getattr(item, "fixturenames", ()))
    for fixture, group in SERVER_GROUPS.items():
        if fixture in names:
            return group
    module = getattr(item, "module", None)
    if module is None:
        return None
    if module.__name__ in variant_modules:
        return VARIANTS_GROUP
    definitions = getattr(item, "_fixtureinfo", None)
    for name in names:
        defs = definitions.name2fixturedefs.get(name) if definitions else None
        if defs and defs[-1].scope == "module":
            return module.__name__
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks in the workers
def pytest_collection_modifyitems(config, items):
    variant_modules = set()
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            variant_modules.add(item.module.__name__)  # fixturenames: a Python test, which has a module
    rank = {}
    for item in items:
        group = xdist_group(item, variant_modules)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        rank[item.nodeid] = GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER) + (group is None)
    items.sort(key=lambda item: rank[item.nodeid])
