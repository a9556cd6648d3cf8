"""The model registry: signed bundles published as MLflow model versions, resolved into fleet Releases.

Where it lives (Registry(uri)):
  sqlite:///registry/registry.db    one file (relative paths from the current folder), artifacts in the
                                    `artifacts` folder beside it (or artifact_root)
  http://host:port                  an `mlflow server --serve-artifacts` (fleet.mlflow_server; its backend
                                    SQLite or PostgreSQL, its --artifacts-destination a folder or s3://);
                                    bundles are uploaded and downloaded through the server's artifact proxy

push(bundles): reads every bundle's signed metadata (fleet.registry_index; verified against a root.json when
given), refuses a mixed push, a class claimed twice or a semver already registered, then logs the bundles and
release.json (the full signed build manifests) as artifacts of one run of experiment "edgestack-releases" and
registers a version of the registered model named after the bundles' Triton model (e.g. detect_detector).
MLflow numbers versions itself; what edgestack needs lives in the version's tags:
  edgestack.semver                 the signed model_version, e.g. 1.2.0 (unique per registered model)
  edgestack.bundle.<class>         {"file", "path" (artifact path in the run), "sha256", "size"} per device class
  edgestack.metrics.<class>        {"fidelity_map", "p50_ms", "p99_ms", "power_w"}: what was measured, per class
  edgestack.build_manifest         {bundle file: quantization, calibration set, source and manifest hashes}
  edgestack.build_time             when the bundles were made (newest bundle file's mtime unless given)
  edgestack.target, edgestack.artifact_uri (the run's artifact root)
and the changelog is the version's description. Aliases (promote) are MLflow's: production, canary, ...

resolve(model, ref) -> fleet.protocol.Release: ref is an MLflow version number (3), a semver (1.2.0) or an
alias (production). Bundle URLs are what a device fetches: the server's proxied artifact URL
(<server>/api/2.0/mlflow-artifacts/artifacts/<path>, served with Range support from a local destination),
with SQLite the artifact's absolute path, or bundle_base_url + the path under the artifact root when an HTTP
server (or S3 website) serves that root.
MLflow's own errors become RegistryError; MLflow is imported on first use (about 1.5 s).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import quote, unquote, urlparse

from fleet.errors import ProtocolError, RegistryError
from fleet.protocol import BundleRef, Release, check_token
from fleet.registry_index import (BundleInfo, check_metrics, index_bundles, merge_metrics, read_bundle,
                                  report_metrics)

ENV_REGISTRY = "EDGESTACK_REGISTRY"
DEFAULT_REGISTRY = "sqlite:///registry/registry.db"
EXPERIMENT = "edgestack-releases"
TAG_SEMVER = "edgestack.semver"
TAG_BUNDLE = "edgestack.bundle."
TAG_METRICS = "edgestack.metrics."
TAG_MANIFEST = "edgestack.build_manifest"
TAG_BUILD_TIME = "edgestack.build_time"
TAG_TARGET = "edgestack.target"
TAG_ARTIFACT_URI = "edgestack.artifact_uri"
BUNDLES_DIR = "bundles"
RELEASE_JSON = "release.json"
PROXY_PATH = "/api/2.0/mlflow-artifacts/artifacts/"
_VERSION_NUMBER = re.compile(r"^[1-9]\d*$")


def quiet_mlflow_environment(env: dict[str, str] | os._Environ = os.environ) -> None:
    """MLflow's switches for usage telemetry, its INFO logging (database migrations) and the run links it
    prints to stdout when a run ends."""
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    env.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def default_registry_uri() -> str:
    return os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY


@dataclass(frozen=True)
class BundleEntry:
    file: str
    path: str  # artifact path inside the version's run, e.g. bundles/detector-1.2.0-avx2.tar
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelVersionRecord:
    """One registered model version as edgestack reads it back from MLflow."""
    model: str
    registry_version: str
    semver: str | None
    aliases: tuple[str, ...]
    bundles: Mapping[str, BundleEntry]  # device class -> bundle
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    build_manifest: Mapping[str, Any] = field(default_factory=dict)
    changelog: str = ""
    build_time: str | None = None
    registered_at: str | None = None
    target: str | None = None
    run_id: str | None = None
    artifact_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        return out


def _iso(timestamp_ms: int | None) -> str | None:
    if not timestamp_ms:
        return None
    moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_tag(tags: Mapping[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(tags[key]) if key in tags else default
    except ValueError:
        return default


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


class Registry:
    """Publish, list, promote and resolve model versions in an MLflow model registry (see the module doc)."""

    def __init__(self, uri: str | None = None, *, artifact_root: Path | None = None,
                 bundle_base_url: str | None = None):
        uri = uri or default_registry_uri()
        self.artifact_root: Path | None = None
        if uri.startswith("sqlite:///"):
            db = _sqlite_path(uri).resolve()
            self.uri = "sqlite:///" + str(db)
            self.artifact_root = Path(artifact_root or db.parent / "artifacts").resolve()
            self._db = db
        elif uri.startswith(("http://", "https://")):
            self.uri = uri.rstrip("/")
            self._db = None
        else:
            raise RegistryError(f"registry {uri!r}: use sqlite:///PATH.db or the URL of an `mlflow server "
                                "--serve-artifacts` (http://host:port; PostgreSQL and S3 go behind that server)")
        self.bundle_base_url = bundle_base_url.rstrip("/") if bundle_base_url else None
        self._client = None
        self._experiment_id: str | None = None

    # --- MLflow plumbing --------------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            quiet_mlflow_environment()
            from mlflow import MlflowClient

            if self._db is not None:
                self._db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    @contextmanager
    def _mlflow(self, what: str) -> Iterator[None]:
        quiet_mlflow_environment()
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            message = str(getattr(exc, "message", exc)).splitlines()[0][:300]
            raise RegistryError(f"{what}: {message} (registry {self.uri})") from exc

    def _experiment(self) -> str:
        if self._experiment_id is None:
            with self._mlflow(f"experiment {EXPERIMENT}"):
                experiment = self.client.get_experiment_by_name(EXPERIMENT)
                if experiment is not None:
                    self._experiment_id = experiment.experiment_id
                else:
                    location = self.artifact_root.as_uri() if self.artifact_root else None
                    self._experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=location)
        return self._experiment_id

    def _version(self, model: str, ref: str):
        """The MLflow ModelVersion a ref names: a version number, a semver tag or an alias."""
        from sidecar.bundle import SEMVER

        model = _model(model)
        if not isinstance(ref, str) or not ref:
            raise RegistryError(f"{model}: name a version (3), a semantic version (1.2.0) or an alias, not {ref!r}")
        if _VERSION_NUMBER.match(ref):
            with self._mlflow(f"{model} version {ref}"):
                return self.client.get_model_version(model, ref)
        if SEMVER.match(ref):
            found = self._by_semver(model, ref)
            if not found:
                raise RegistryError(f"{model} has no version with semver {ref}")
            ref = str(found[0].version)  # searches leave a version's aliases out: read it whole
            with self._mlflow(f"{model} version {ref}"):
                return self.client.get_model_version(model, ref)
        with self._mlflow(f"{model} alias {ref!r}"):
            return self.client.get_model_version_by_alias(model, ref)

    def _by_semver(self, model: str, semver: str) -> list:
        with self._mlflow(f"search {model} {semver}"):
            found = self.client.search_model_versions(f"name='{model}' and tag.`{TAG_SEMVER}`='{semver}'")
        return sorted(found, key=lambda v: int(v.version))

    def _record(self, version, aliases: Sequence[str] | None = None) -> ModelVersionRecord:
        tags = dict(version.tags or {})
        if aliases is None:
            aliases = getattr(version, "aliases", None) or ()
        bundles = {key[len(TAG_BUNDLE):]: BundleEntry(**_json_tag(tags, key, {}))
                   for key in sorted(tags) if key.startswith(TAG_BUNDLE)}
        metrics = {key[len(TAG_METRICS):]: _json_tag(tags, key, {})
                   for key in sorted(tags) if key.startswith(TAG_METRICS)}
        return ModelVersionRecord(
            model=version.name, registry_version=str(version.version), semver=tags.get(TAG_SEMVER),
            aliases=tuple(sorted(aliases)), bundles=bundles, metrics=metrics,
            build_manifest=_json_tag(tags, TAG_MANIFEST, {}), changelog=version.description or "",
            build_time=tags.get(TAG_BUILD_TIME), registered_at=_iso(version.creation_timestamp),
            target=tags.get(TAG_TARGET), run_id=version.run_id, artifact_uri=tags.get(TAG_ARTIFACT_URI))

    # --- publishing -------------------------------------------------------------------------------------

    def push(self, bundles: Sequence[Path], *, version: str | None = None, changelog: str = "",
             metrics: Mapping[str, Mapping[str, float]] | None = None, report: Path | None = None,
             root_json: Path | None = None, build_time: str | None = None) -> ModelVersionRecord:
        """Register one model version made of `bundles` (one per device-class set); see the module doc.
        metrics: {class: {fidelity_map, p50_ms, p99_ms, power_w}}, over those read from `report`."""
        root = _read_root(root_json) if root_json is not None else None
        infos = [read_bundle(Path(p), root) for p in bundles]
        index = index_bundles(infos)
        first = infos[0]
        model, semver = first.model_name, first.model_version
        if version is not None and version != semver:
            raise RegistryError(f"--version {version} differs from the bundles' signed model_version {semver}: "
                                "devices report the signed one; sign the bundles with the version to publish")
        measured = merge_metrics(report_metrics(Path(report), infos) if report is not None else {},
                                 check_metrics(metrics or {}, list(index)))
        if self._by_semver(model, semver):
            raise RegistryError(f"{model} {semver} is already registered (version "
                                f"{self._by_semver(model, semver)[0].version}); a semver is published once")
        experiment = self._experiment()
        with self._mlflow(f"push {model} {semver}"):
            run = self.client.create_run(experiment, run_name=f"{model} {semver}",
                                         tags={"edgestack.model": model, TAG_SEMVER: semver})
        run_id = run.info.run_id
        try:
            with self._mlflow(f"push {model} {semver}: artifacts"):
                for info in infos:
                    self.client.log_artifact(run_id, str(info.path), BUNDLES_DIR)
                self.client.log_dict(run_id, _release_document(infos, index, measured, changelog), RELEASE_JSON)
            tags = _version_tags(infos, index, measured, run.info.artifact_uri, build_time)
            with self._mlflow(f"push {model} {semver}: register"):
                self._ensure_registered_model(model)
                created = self.client.create_model_version(model, f"runs:/{run_id}/{BUNDLES_DIR}", run_id=run_id,
                                                           tags=tags, description=changelog or None)
            self._keep_first(model, semver, created)
        except BaseException:
            with suppress(RegistryError), self._mlflow("mark the failed push's run"):
                self.client.set_terminated(run_id, "FAILED")
            raise
        with self._mlflow(f"push {model} {semver}"):
            self.client.set_terminated(run_id, "FINISHED")
            return self._record(self.client.get_model_version(model, created.version))

    def _ensure_registered_model(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model, description=f"edgestack bundles of Triton model {model}")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _keep_first(self, model: str, semver: str, created) -> None:
        """Two pushes of one semver that raced past the check: the later version removes itself."""
        same = self._by_semver(model, semver)
        if same and str(same[0].version) != str(created.version):
            with self._mlflow(f"{model} {semver}: drop the duplicate"):
                self.client.delete_model_version(model, created.version)
            raise RegistryError(f"{model} {semver} was registered concurrently as version {same[0].version}; "
                                "a semver is published once")

    # --- reading ----------------------------------------------------------------------------------------

    def list(self, model: str | None = None) -> list[ModelVersionRecord]:
        """Every version pushed by edgestack (with a semver tag), of one model or of all, newest first."""
        where = f"name='{_model(model)}'" if model is not None else ""
        with self._mlflow(f"list {model or 'models'}"):
            versions = self.client.search_model_versions(where, max_results=10_000)
        ours = [v for v in versions if TAG_SEMVER in (v.tags or {})]
        aliases: dict[tuple[str, str], list[str]] = {}
        for name in sorted({v.name for v in ours}):  # searches leave aliases out; the registered model has them
            with self._mlflow(f"aliases of {name}"):
                for alias, number in self.client.get_registered_model(name).aliases.items():
                    aliases.setdefault((name, str(number)), []).append(alias)
        records = [self._record(v, aliases.get((v.name, str(v.version)), [])) for v in ours]
        return sorted(records, key=lambda r: (r.model, -int(r.registry_version)))

    def show(self, model: str, ref: str) -> ModelVersionRecord:
        return self._record(self._version(model, ref))

    def promote(self, model: str, ref: str, alias: str) -> ModelVersionRecord:
        """Point `alias` (production, canary, ...) at the version `ref` names; it moves off any other version."""
        version = self._version(model, ref)
        if TAG_SEMVER not in (version.tags or {}):
            raise RegistryError(f"{model} version {version.version} was not pushed by edgestack (no {TAG_SEMVER})")
        with self._mlflow(f"promote {model} {ref} to {alias!r}"):
            self.client.set_registered_model_alias(version.name, alias, version.version)
            return self._record(self.client.get_model_version(version.name, version.version))

    def resolve(self, model: str, ref: str) -> Release:
        """The Release a rollout installs: a fetchable BundleRef per device class, and the measured metrics."""
        record = self.show(model, ref)
        if not record.bundles or record.semver is None or record.artifact_uri is None:
            raise RegistryError(f"{record.model} version {record.registry_version} carries no edgestack bundles "
                                "(not published by `edgestack registry push`)")
        refs = {c: BundleRef(url=self.bundle_url(record.artifact_uri, b.path), sha256=b.sha256, size=b.size)
                for c, b in record.bundles.items()}
        try:
            return Release.from_dict(Release(model=record.model, version=record.semver, bundles=refs,
                                             metrics=record.metrics,
                                             registry_version=record.registry_version).to_dict())
        except ProtocolError as exc:
            raise RegistryError(f"{record.model} version {record.registry_version}: {exc}") from exc

    def bundle_url(self, artifact_uri: str, path: str) -> str:
        """Where a device fetches the artifact `path` of a run whose artifact root is artifact_uri."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":
            relative = posixpath.join(unquote(parsed.path).lstrip("/"), path)
            base = self.bundle_base_url or (f"http://{parsed.netloc}" if parsed.netloc else self.uri) + PROXY_PATH
            return base.rstrip("/") + "/" + quote(relative)
        if parsed.scheme in ("", "file"):
            local = Path(unquote(parsed.path)) / path
            if self.bundle_base_url is None:
                return str(local.resolve())
            root = self.artifact_root or Path(unquote(urlparse(self._experiment_location()).path))
            try:
                relative = local.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                raise RegistryError(f"artifact {local} is not under the artifact root {root}") from None
            return f"{self.bundle_base_url}/{quote(relative)}"
        if self.bundle_base_url is not None:
            location = self._experiment_location().rstrip("/")
            full = f"{artifact_uri.rstrip('/')}/{path}"
            if full.startswith(location + "/"):
                return f"{self.bundle_base_url}/{quote(full[len(location) + 1:])}"
        if parsed.scheme in ("http", "https"):
            return f"{artifact_uri.rstrip('/')}/{quote(path)}"
        raise RegistryError(f"artifacts at {artifact_uri} ({parsed.scheme}) are not fetchable by a device: serve them "
                            "through `mlflow server --serve-artifacts` or give bundle_base_url")

    def _experiment_location(self) -> str:
        with self._mlflow(f"experiment {EXPERIMENT}"):
            return self.client.get_experiment(self._experiment()).artifact_location


def _model(model: Any) -> str:
    try:
        return check_token(model, "model")
    except ProtocolError as exc:
        raise RegistryError(str(exc)) from None


def _read_root(path: Path) -> dict:
    try:
        root = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read root metadata {path}: {exc}") from exc
    if not isinstance(root, dict):
        raise RegistryError(f"{path}: root metadata must be a signed envelope (a JSON object)")
    return root


def _build_time(infos: Sequence[BundleInfo]) -> str:
    newest = max(info.path.stat().st_mtime for info in infos)
    return datetime.fromtimestamp(newest, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _version_tags(infos: Sequence[BundleInfo], index: Mapping[str, BundleInfo],
                  metrics: Mapping[str, Mapping[str, float]], artifact_uri: str, build_time: str | None) -> dict:
    first = infos[0]
    tags = {TAG_SEMVER: first.model_version, TAG_TARGET: ",".join(sorted({i.target for i in infos})),
            TAG_BUILD_TIME: build_time or _build_time(infos), TAG_ARTIFACT_URI: artifact_uri,
            TAG_MANIFEST: _dumps({i.path.name: i.manifest_summary() for i in infos})}
    for device_class, info in index.items():
        tags[TAG_BUNDLE + device_class] = _dumps(asdict(BundleEntry(
            file=info.path.name, path=f"{BUNDLES_DIR}/{info.path.name}", sha256=info.sha256, size=info.size)))
    for device_class, values in metrics.items():
        tags[TAG_METRICS + device_class] = _dumps(values)
    return tags


def _release_document(infos: Sequence[BundleInfo], index: Mapping[str, BundleInfo],
                      metrics: Mapping[str, Mapping[str, float]], changelog: str) -> dict:
    """release.json beside the bundles: everything the tags hold, plus the full signed build manifests."""
    return {"model": infos[0].model_name, "version": infos[0].model_version, "changelog": changelog,
            "bundles": {c: info.path.name for c, info in index.items()}, "metrics": dict(metrics),
            "files": {i.path.name: {"sha256": i.sha256, "size": i.size, "target": i.target,
                                    "metadata_version": i.metadata_version, "built_for": list(i.built_for),
                                    "verified_on": list(i.verified_on), "delta_base": i.delta_base,
                                    "build_manifest": dict(i.build_manifest)} for i in infos}}
