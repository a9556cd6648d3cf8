"""Device classes: parsing what a device is, matching what an artifact needs, and the bundle's signed classes."""
from __future__ import annotations

import json
import re

import pytest

from builder import device_class as D
from sidecar.bundle_classes import check_fits_device, default_classes, unverified_here
from sidecar.errors import BundleError

# /proc/cpuinfo excerpts of the machine kinds a fleet holds (flags trimmed to the ones that matter and a few others)
EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2\n"
EPYC_VNNI = ("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: sse4_2 avx avx2 fma avx512f avx512dq avx512bw "
             "avx512vl avx512_vnni avx512_bf16\n")
SKYLAKE_SP = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl\n"
ALDER_LAKE = "model name\t: 12th Gen Intel(R) Core(TM) i7-1265U\nflags\t\t: sse4_2 avx avx2 fma avx_vnni\n"
SAPPHIRE = ("model name\t: Intel(R) Xeon(R) Platinum 8480\nflags\t\t: avx2 avx512f avx512bw avx512_vnni amx_tile "
            "amx_int8 amx_bf16\n")
ORIN = ("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
        "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n")
PI3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text, arch, expected", [
    (EPYC_AVX2, "x86_64", "x86-avx2"),
    (EPYC_VNNI, "x86_64", "x86-vnni"),
    (SKYLAKE_SP, "x86_64", "x86-avx512"),
    (ALDER_LAKE, "x86_64", "x86-vnni"),
    (SAPPHIRE, "x86_64", "x86-vnni"),
    ("flags\t\t: sse sse2 sse4_2\n", "x86_64", "x86-sse"),
    (ORIN, "aarch64", "arm64-dotprod"),
    (PI3, "aarch64", "arm64-neon"),
])
def test_cpu_class_from_cpuinfo(text, arch, expected):
    info = D.detect(text, arch, gpu=False)
    assert info.cpu_class == expected and info.classes == (expected,)


def test_features_are_named_and_unknown_flags_dropped():
    model, features = D.parse_cpuinfo(SAPPHIRE, "x86_64")
    assert model.startswith("Intel(R) Xeon(R) Platinum")
    assert set(features) == {"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    assert D.parse_cpuinfo(ORIN, "aarch64")[1] == ("dotprod", "fp16", "neon")


def test_descriptor_with_a_gpu_names_its_compute_capability_class():
    info = D.DeviceInfo("aarch64", "", ("neon", "dotprod"), "NVIDIA Orin", "8.7", "2.51.0")
    data = info.to_dict()
    assert data["classes"] == ["arm64-dotprod", "cuda-sm87"] and data["triton_version"] == "2.51.0"
    json.dumps(data)


def test_this_machine_has_a_known_class_and_the_override_wins(monkeypatch):
    monkeypatch.delenv("EDGESTACK_DEVICE_CLASS", raising=False)
    assert D.host_class() in D.CPU_CLASSES
    monkeypatch.setenv("EDGESTACK_DEVICE_CLASS", "x86-avx2")
    assert D.host_class() == "x86-avx2"
    monkeypatch.setenv("EDGESTACK_DEVICE_CLASS", "pentium")
    with pytest.raises(D.DeviceClassError, match="unknown device class 'pentium'"):
        D.host_class()


def test_unknown_architecture_is_refused():
    with pytest.raises(D.DeviceClassError, match="riscv64"):
        D.cpu_class("riscv64", ())


def test_artifact_classes_fit_and_verification():
    u8s8 = D.ArtifactClasses(("x86-vnni",), ("x86-vnni",))
    assert u8s8.fits(["x86-vnni"]) and not u8s8.fits(["x86-avx2"]) and not u8s8.fits(["x86-avx512"])
    reduced = D.ArtifactClasses(D.X86_CLASSES, ("x86-vnni",))
    assert reduced.fits(["x86-avx2"]) and not reduced.verified_for(["x86-avx2"]) and reduced.verified_for(["x86-vnni"])
    gpu = D.ArtifactClasses((D.ANY_CUDA,))
    assert gpu.fits(["arm64-dotprod", "cuda-sm87"]) and not gpu.fits(["x86-vnni"])
    assert D.ArtifactClasses.from_dict(reduced.to_dict()) == reduced


@pytest.mark.parametrize("data, message", [
    ({"built_for": []}, "at least one"),
    ({"built_for": ["x86-avx3"]}, "unknown device class 'x86-avx3'"),
    ({"built_for": ["x86-avx2"], "verified_on": ["x86-vnni"]}, "verified on ['x86-vnni'] but not built for them"),
    ({"built_for": "x86-avx2"}, "must be"),
    ("x86-avx2", "must be"),
])
def test_malformed_artifact_classes_are_refused(data, message):
    with pytest.raises(D.DeviceClassError, match=re.escape(message)):
        D.ArtifactClasses.from_dict(data)


# --- bundles ----------------------------------------------------------------------------------------------

def test_float_model_defaults_to_its_target_classes(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07" + b"Conv" * 10)
    assert default_classes("cpu", {"model.onnx": model}).built_for == D.CPU_CLASSES
    assert default_classes("jetson", {"model.onnx": model}).built_for == (D.ANY_CUDA,)


def test_int8_model_needs_its_classes_stated(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07QLinearConv\x00DequantizeLinear")
    with pytest.raises(BundleError, match="model.onnx is an INT8 model"):
        default_classes("cpu", {"model.onnx": model})
    manifest = {"device_classes": {"built_for": ["x86-vnni"], "verified_on": ["x86-vnni"]}}
    assert default_classes("cpu", {"model.onnx": model}, manifest).built_for == ("x86-vnni",)


def test_device_fit_checks_target_then_class():
    signed = {"target": "cpu", "device_classes": {"built_for": ["x86-vnni"], "verified_on": []}}
    check_fits_device(signed, "cpu", ("x86-vnni",))
    with pytest.raises(BundleError, match="for target cpu; this device serves target intel"):
        check_fits_device(signed, "intel", ("x86-vnni",))
    with pytest.raises(BundleError, match="this device is x86-avx2"):
        check_fits_device(signed, "cpu", ("x86-avx2",))
    check_fits_device({**signed, "target": "jetson", "device_classes": {"built_for": ["cuda-any"]}}, "nvidia-gpu",
                      ("x86-avx2", "cuda-sm90"))
    assert unverified_here(signed, ("x86-vnni",))
    with pytest.raises(BundleError, match="names no device_classes"):
        check_fits_device({"target": "cpu"}, "cpu", ("x86-vnni",))


def test_a_served_variants_classes_travel_from_optimize_to_the_bundle(tmp_path, capsys):
    """optimize saves the classes with the variant; build --variant records them in the repository; bundle create
    of the repository's detector signs them without being told."""
    import argparse
    import shutil

    from builder.optimize.manifest import manifest_sha256
    from builder.optimize.variants import Variant, save_variant
    from builder.repository import render_repository
    from builder.spec import load_spec
    from sidecar import cli
    from sidecar.bundle import read_signed_unverified
    from tests.conftest import MODEL, SPEC

    classes = D.ArtifactClasses(("x86-vnni",), ("x86-vnni",)).to_dict()
    folder = tmp_path / "variants" / "int8-x"
    folder.mkdir(parents=True)
    shutil.copy(MODEL, folder / "model.onnx")
    variant = Variant("int8-x", "onnxruntime", "int8", folder / "model.onnx", {}, ("cpu",))
    manifest = {"format": 1, "variant": {"name": "int8-x"}, "device_classes": classes}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    save_variant(variant, manifest, classes)
    repo = render_repository(load_spec(SPEC), tmp_path / "repo", variant=variant)

    parser = argparse.ArgumentParser(prog="edgestack")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    keys = parser.parse_args(["keys", "init", "--dir", str(tmp_path / "keys")])
    assert keys.func(keys) == 0
    args = parser.parse_args(["bundle", "create", str(repo / "detect_detector" / "1"), "--model-name", "detect_detector",
                              "--model-version", "1.0.0", "--target", "cpu", "--metadata-version", "1", "--keys",
                              str(tmp_path / "keys"), "--out", str(tmp_path / "v.bundle")])
    assert args.func(args) == 0
    assert "device classes x86-vnni" in capsys.readouterr().out
    signed = read_signed_unverified(tmp_path / "v.bundle")
    assert signed["device_classes"] == classes and signed["build_manifest"] == manifest
