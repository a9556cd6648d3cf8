"""fleet.registry (+ registry_index, registry_cli): signed bundles pushed to a real MLflow registry in a SQLite
file, refused when they do not make one model version, read back, promoted and resolved into fleet Releases."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from builder.device_class import ArtifactClasses
from fleet import registry_cli
from fleet.errors import RegistryError
from fleet.protocol import Release
from fleet.registry import RELEASE_JSON, Registry
from fleet.registry_index import check_metrics, parse_metric
from sidecar.bundle import create_bundle
from sidecar.keys import generate_key
from sidecar.trust import format_time, make_root, sign

EXPIRES = format_time(datetime.now(timezone.utc) + timedelta(days=30))
MANIFEST = {"variant": {"name": "int8-entropy", "runtime": "onnxruntime", "precision": "int8"},
            "calibration_sha256": "c" * 64, "source_model": {"file": "model.onnx", "sha256": "5" * 64},
            "options": {"calibration": "entropy", "quant_format": "qdq"}, "manifest_sha256": "m" * 64}


@pytest.fixture(scope="module")
def keys():
    return {"root": [generate_key()], "bundle": [generate_key()], "stranger": [generate_key()]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """One registry file for the module (MLflow creates its tables once); each test uses its own model name."""
    return Registry(f"sqlite:///{tmp_path_factory.mktemp('registry')}/registry.db")


@pytest.fixture
def make(tmp_path, keys):
    folder = tmp_path / "model" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(os.urandom(4000))

    def make_bundle(name: str, *, model="detect_detector", semver="1.2.0", built_for=("x86-avx2",),
                    verified_on=(), signer="bundle", manifest=None) -> Path:
        return create_bundle(folder, tmp_path / name, model_name=model, model_version=semver, target="cpu",
                             metadata_version=1, keys=keys[signer], expires=EXPIRES, build_manifest=manifest,
                             device_classes=ArtifactClasses(tuple(built_for), tuple(verified_on)))
    return make_bundle


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_records_bundles_per_class_metrics_manifest_and_changelog(registry, make):
    avx = make("det-x86.tar", model="m_push", built_for=("x86-avx2", "x86-vnni"), manifest=MANIFEST)
    arm = make("det-arm.tar", model="m_push", built_for=("arm64-neon",))
    record = registry.push([avx, arm], changelog="INT8 entropy\nfaster on VNNI",
                           metrics={"x86-vnni": {"fidelity_map": 0.97, "p50_ms": 20.5, "p99_ms": 31.0},
                                    "arm64-neon": {"power_w": 4.5}}, build_time="2030-01-01T00:00:00Z")

    assert (record.model, record.semver, record.registry_version) == ("m_push", "1.2.0", "1")
    assert sorted(record.bundles) == ["arm64-neon", "x86-avx2", "x86-vnni"]
    assert record.bundles["x86-vnni"] == record.bundles["x86-avx2"]
    assert (record.bundles["x86-avx2"].sha256, record.bundles["x86-avx2"].size) == (sha256(avx), avx.stat().st_size)
    assert record.bundles["arm64-neon"].path == "bundles/det-arm.tar"
    assert record.metrics == {"x86-vnni": {"fidelity_map": 0.97, "p50_ms": 20.5, "p99_ms": 31.0},
                              "arm64-neon": {"power_w": 4.5}}
    assert record.build_manifest["det-x86.tar"] == {
        "variant": "int8-entropy", "runtime": "onnxruntime", "precision": "int8", "calibration_sha256": "c" * 64,
        "source_model": {"file": "model.onnx", "sha256": "5" * 64}, "manifest_sha256": "m" * 64,
        "calibration": "entropy", "quant_format": "qdq"}
    assert record.build_manifest["det-arm.tar"] == {}
    assert record.changelog == "INT8 entropy\nfaster on VNNI"
    assert (record.build_time, record.target) == ("2030-01-01T00:00:00Z", "cpu")
    assert registry.show("m_push", "1.2.0") == record

    artifacts = Path(record.artifact_uri.removeprefix("file://"))
    release = json.loads((artifacts / RELEASE_JSON).read_text())
    assert release["files"]["det-x86.tar"]["build_manifest"] == MANIFEST
    assert (artifacts / "bundles" / "det-arm.tar").read_bytes() == arm.read_bytes()


def test_resolve_by_number_semver_and_alias_gives_fetchable_paths(registry, make):
    first = make("a.tar", model="m_resolve", semver="1.0.0", built_for=("x86-avx2",))
    registry.push([first], metrics={"x86-avx2": {"p99_ms": 40.0}})
    second = make("b.tar", model="m_resolve", semver="1.1.0", built_for=("x86-avx2", "arm64-neon"))
    registry.push([second])
    registry.promote("m_resolve", "1.0.0", "production")

    by_alias = registry.resolve("m_resolve", "production")
    assert by_alias == registry.resolve("m_resolve", "1") == registry.resolve("m_resolve", "1.0.0")
    assert (by_alias.version, by_alias.registry_version, by_alias.metrics) == ("1.0.0", "1", {"x86-avx2": {"p99_ms": 40.0}})
    ref = by_alias.bundles["x86-avx2"]
    assert Path(ref.url).is_absolute() and sha256(Path(ref.url)) == ref.sha256 == sha256(first)
    assert Release.from_dict(by_alias.to_dict()) == by_alias
    newest = registry.resolve("m_resolve", "1.1.0")
    assert newest.bundle_for(("arm64-neon",)).sha256 == sha256(second)

    registry.promote("m_resolve", "2", "production")  # an alias moves
    assert registry.resolve("m_resolve", "production").version == "1.1.0"
    assert [(r.registry_version, r.aliases) for r in registry.list("m_resolve")] == [("2", ("production",)), ("1", ())]


def test_bundle_base_url_maps_the_artifact_root(registry, make):
    registry.push([make("c.tar", model="m_base_url")])
    served = Registry(registry.uri, bundle_base_url="http://files.example:8080/artifacts/")
    record = served.show("m_base_url", "1.2.0")
    url = served.resolve("m_base_url", "1.2.0").bundles["x86-avx2"].url
    assert url == f"http://files.example:8080/artifacts/{record.run_id}/artifacts/bundles/c.tar"
    assert (registry.artifact_root / record.run_id / "artifacts" / "bundles" / "c.tar").is_file()


def test_proxied_artifact_urls_of_a_tracking_server():
    server = Registry("http://127.0.0.1:5000/")
    assert server.bundle_url("mlflow-artifacts:/1/abc/artifacts", "bundles/d x.tar") == \
        "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/bundles/d%20x.tar"
    assert server.bundle_url("mlflow-artifacts://mlflow:5000/1/abc/artifacts", "bundles/d.tar") == \
        "http://mlflow:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/bundles/d.tar"
    with pytest.raises(RegistryError, match="not fetchable by a device"):
        server.bundle_url("s3://bucket/1/abc/artifacts", "bundles/d.tar")


@pytest.mark.parametrize("case, message", [
    ("same class twice", "device class x86-avx2 is claimed by both one.tar and two.tar"),
    ("two semvers", "one push publishes one model version"),
    ("two models", "one push publishes one model version"),
    ("version differs", "--version 9.9.9 differs from the bundles' signed model_version 1.2.0"),
    ("metrics of a class without bundle", "no bundle of this push is built for device class 'arm64-neon'"),
    ("unknown metric", "metrics.x86-avx2.latency: unknown metric"),
    ("not a bundle", "broken.tar: not a readable bundle"),
    ("missing file", "does not exist"),
])
def test_push_refuses_what_is_not_one_model_version_and_registers_nothing(registry, make, tmp_path, case, message):
    one = make("one.tar", model="m_refuse")
    options, bundles = {}, [one]
    if case == "same class twice":
        bundles.append(make("two.tar", model="m_refuse", built_for=("x86-avx2", "x86-vnni")))
    elif case == "two semvers":
        bundles.append(make("two.tar", model="m_refuse", semver="1.3.0", built_for=("arm64-neon",)))
    elif case == "two models":
        bundles.append(make("two.tar", model="m_other", built_for=("arm64-neon",)))
    elif case == "version differs":
        options["version"] = "9.9.9"
    elif case == "metrics of a class without bundle":
        options["metrics"] = {"arm64-neon": {"p50_ms": 3.0}}
    elif case == "unknown metric":
        options["metrics"] = {"x86-avx2": {"latency": 3.0}}
    elif case == "not a bundle":
        (tmp_path / "broken.tar").write_bytes(b"no tar here")
        bundles.append(tmp_path / "broken.tar")
    elif case == "missing file":
        bundles.append(tmp_path / "absent.tar")
    with pytest.raises(RegistryError, match=message.replace("(", r"\(").replace("'", ".")):
        registry.push(bundles, **options)
    assert registry.list("m_refuse") == []


def test_a_semver_is_published_once(registry, make):
    registry.push([make("first.tar", model="m_once")])
    with pytest.raises(RegistryError, match=r"m_once 1.2.0 is already registered \(version 1\)"):
        registry.push([make("again.tar", model="m_once", built_for=("arm64-neon",))])
    assert [r.registry_version for r in registry.list("m_once")] == ["1"]


def test_push_verifies_against_a_root_when_given(registry, make, keys, tmp_path):
    root = tmp_path / "root.json"
    root.write_text(json.dumps(sign(make_root(version=1, expires=EXPIRES, root_keys=keys["root"], root_threshold=1,
                                              bundle_keys=keys["bundle"], bundle_threshold=1), keys["root"])))
    with pytest.raises(RegistryError, match="forged.tar: does not verify against the given root"):
        registry.push([make("forged.tar", model="m_root", signer="stranger")], root_json=root)
    record = registry.push([make("signed.tar", model="m_root")], root_json=root)
    assert record.semver == "1.2.0"

    base = tmp_path / "model" / "1"
    changed = tmp_path / "model2" / "1"
    changed.mkdir(parents=True)
    (changed / "model.onnx").write_bytes((base / "model.onnx").read_bytes()[:3000] + os.urandom(1000))
    delta = create_bundle(changed, tmp_path / "delta.tar", model_name="m_root", model_version="1.3.0", target="cpu",
                          metadata_version=2, keys=keys["bundle"], expires=EXPIRES, base_dir=base,
                          base_model_version="1.2.0", device_classes=ArtifactClasses(("x86-avx2",)))
    assert registry.push([delta], root_json=root).semver == "1.3.0"  # metadata verified; files need the base


def test_metrics_from_an_optimize_report(registry, make, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({
        "context": {"host_device_class": "x86-vnni"},
        "variants": [{"name": "fp32", "map50": 1.0, "p50_ms": 50.0, "p99_ms": 60.0},
                     {"name": "int8-entropy", "map50": 0.96, "p50_ms": 21.0, "p99_ms": 25.0,
                      "device_classes": {"built_for": ["x86-vnni", "x86-avx512"], "verified_on": ["x86-vnni"]}}]}))
    bundle = make("int8.tar", model="m_report", built_for=("x86-vnni", "x86-avx512"), verified_on=("x86-vnni",),
                  manifest=MANIFEST)
    record = registry.push([bundle], report=report, metrics={"x86-vnni": {"power_w": 12.0, "p99_ms": 26.0}})
    assert record.metrics == {"x86-vnni": {"fidelity_map": 0.96, "p50_ms": 21.0, "p99_ms": 26.0, "power_w": 12.0}}

    unnamed = make("fp16.tar", model="m_report", semver="1.3.0", manifest={"variant": {"name": "fp16"}})
    with pytest.raises(RegistryError, match="no variant 'fp16' .* among fp32, int8-entropy"):
        registry.push([unnamed], report=report)


def test_unknown_versions_aliases_and_bad_names_are_clear_errors(registry, make):
    registry.push([make("e.tar", model="m_errors")])
    with pytest.raises(RegistryError, match="m_errors version 7"):
        registry.show("m_errors", "7")
    with pytest.raises(RegistryError, match="m_errors has no version with semver 3.0.0"):
        registry.resolve("m_errors", "3.0.0")
    with pytest.raises(RegistryError, match="m_errors alias 'staging'"):
        registry.resolve("m_errors", "staging")
    with pytest.raises(RegistryError, match="model must be 1-64 characters"):
        registry.list("bad name")
    with pytest.raises(RegistryError, match="use sqlite:///PATH.db or the URL"):
        Registry("postgresql://db/mlflow")


def test_metric_options_are_checked_per_field():
    assert parse_metric("x86-avx2:p99_ms=41.5") == ("x86-avx2", "p99_ms", 41.5)
    for text, message in (("x86-avx2:p99=1", "expected CLASS:NAME=VALUE"), ("p99_ms=1", "expected CLASS:NAME=VALUE"),
                          ("x86-avx2:p99_ms=fast", "'fast' is not a number"),
                          ("x86-avx2:power_w=-1", "power_w must be a finite number >= 0")):
        with pytest.raises(RegistryError, match=message):
            parse_metric(text)
    with pytest.raises(RegistryError, match=r"metrics.x86-avx2.fidelity_map must be in \[0, 1\]"):
        check_metrics({"x86-avx2": {"fidelity_map": 1.5}}, ["x86-avx2"])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="edgestack")
    registry_cli.add_parser(top.add_subparsers(dest="command", required=True))
    return top


def run_cli(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.func(args)


def test_cli_push_list_show_promote(registry, make, capsys):
    bundle = make("cli.tar", model="m_cli", built_for=("x86-avx2", "x86-vnni"))
    uri = ["--registry", registry.uri]
    assert run_cli("registry", "push", str(bundle), "--changelog", "from the CLI", "--metric", "x86-vnni:p50_ms=12.5",
                   "--metric", "x86-vnni:power_w=7", *uri) == 0
    out = capsys.readouterr().out
    assert "registered m_cli 1.2.0 as version 1" in out and "x86-vnni" in out and "12.5" in out

    assert run_cli("registry", "promote", "m_cli", "1.2.0", "canary", *uri) == 0
    assert "m_cli@canary -> version 1 (1.2.0)" in capsys.readouterr().out
    assert run_cli("registry", "list", "m_cli", *uri) == 0
    assert "canary" in capsys.readouterr().out.splitlines()[2]
    assert run_cli("registry", "list", "m_cli", "--json", *uri) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["semver"], v["aliases"]) for v in listed] == [("1.2.0", ["canary"])]
    assert run_cli("registry", "show", "m_cli", "canary", *uri) == 0
    assert "from the CLI" in capsys.readouterr().out
    assert run_cli("registry", "show", "m_cli", "canary", "--release", *uri) == 0
    release = Release.from_dict(json.loads(capsys.readouterr().out))
    assert release.metrics == {"x86-vnni": {"p50_ms": 12.5, "power_w": 7.0}}
    with pytest.raises(RegistryError, match="already registered"):
        run_cli("registry", "push", str(bundle), *uri)
    with pytest.raises(RegistryError, match="--metric 'x86-vnni:speed=1'"):
        run_cli("registry", "push", str(bundle), "--metric", "x86-vnni:speed=1", *uri)


def test_cli_registry_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESTACK_REGISTRY", f"sqlite:///{tmp_path}/env.db")
    assert parser().parse_args(["registry", "list"]).registry == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.delenv("EDGESTACK_REGISTRY")
    assert parser().parse_args(["registry", "list"]).registry == "sqlite:///registry/registry.db"
