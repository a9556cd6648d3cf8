"""Optimized variants of the fixture detector, each built once per test session and shared by the test modules.

Building INT8 and OpenVINO variants is the slow part of the suite (the entropy KL search alone takes tens of
seconds), and several modules need the same ones: test_ort_variants, test_int8_emulated and test_int8_served the
ONNX Runtime INT8 builds, test_openvino_variants and test_openvino_served the OpenVINO IRs. The session fixture
`shared_variants` (tests/conftest.py) is a VariantCache: it builds a variant the first time it is asked for, into the
session's temp folder, keyed by everything the build depends on (builder, options, calibration set), and hands
back the same Variant afterwards.

The folders are shared: a test that writes into one (save_variant, a rebuild in place) copies it first
(VariantCache.copy). Under pytest-xdist the workers share one root (conftest.shared_variants): the first worker
to ask for a variant builds it under an exclusive file lock and pickles the Variant beside it; the others wait
on the lock and load it, so each variant is still built once per `make test`.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from builder.optimize.calibration import CalibrationSet, load_calibration_set
from builder.optimize.variants import Variant
from builder.spec import load_spec
from tests.conftest import IMAGES, MODEL, SPEC

# The fixture photos the ONNX Runtime INT8 builds calibrate on (the first ones by name), and the OpenVINO ones
# (NNCF's recipe was tuned with 5). The floors of test_int8_served / test_ort_variants were measured with these.
ORT_CALIBRATION_IMAGES = 3
OPENVINO_CALIBRATION_IMAGES = 5


class VariantCache:
    """Builds each distinct variant once under root; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.spec = load_spec(SPEC)
        self._calibrations: dict[int, CalibrationSet] = {}
        self._built: dict[tuple, Variant] = {}

    def calibration(self, count: int = ORT_CALIBRATION_IMAGES) -> CalibrationSet:
        """The first `count` fixture photos by name, preprocessed as the server does (load_calibration_set)."""
        if count not in self._calibrations:
            self._calibrations[count] = load_calibration_set(IMAGES, self.spec.input, self.spec.limits, count)
        return self._calibrations[count]

    def _get(self, key: tuple, build: Callable[[Path], Variant]) -> Variant:
        if key not in self._built:
            folder = self.root / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            built = folder.with_name(folder.name + ".variant.pickle")
            with open(folder.with_name(folder.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building this variant: wait for it
                if not built.exists():
                    variant = build(folder)
                    built.write_bytes(pickle.dumps(variant))
                self._built[key] = pickle.loads(built.read_bytes())
        return self._built[key]

    def ort_int8(self, options: Any, calibration_images: int = ORT_CALIBRATION_IMAGES) -> Variant:
        """builder.optimize.ort_variants.build_int8 of the fixture detector with these QuantOptions."""
        from builder.optimize import ort_variants as ov

        calibration = self.calibration(calibration_images)
        return self._get(("ort-int8", str(MODEL), options, calibration.sha256),
                         lambda out: ov.build_int8(MODEL, out, calibration, self.spec.input_name, options))

    def openvino(self, precision: str = "fp32") -> Variant:
        """builder.optimize.openvino_variants.build_openvino (ov-fp32, ov-fp16) with its defaults."""
        from builder.optimize.openvino_variants import build_openvino

        return self._get(("openvino", str(MODEL), precision), lambda out: build_openvino(MODEL, out, precision))

    def openvino_int8(self, overflow_fix: str | None = None,
                      calibration_images: int = OPENVINO_CALIBRATION_IMAGES) -> Variant:
        """builder.optimize.openvino_variants.build_openvino_int8 (ov-int8, NNCF's default recipe here)."""
        from builder.optimize.openvino_variants import build_openvino_int8

        calibration = self.calibration(calibration_images)
        return self._get(("openvino-int8", str(MODEL), overflow_fix, calibration.sha256),
                         lambda out: build_openvino_int8(MODEL, out, calibration, overflow_fix=overflow_fix))

    @staticmethod
    def copy(variant: Variant, out_dir: Path) -> Variant:
        """A private copy of a shared variant's folder, for a test that writes into it."""
        out_dir = Path(out_dir)
        shutil.copytree(variant.path.parent, out_dir)
        return replace(variant, path=out_dir / variant.path.name, options=copy.deepcopy(variant.options))
