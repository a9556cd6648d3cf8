"""The update agent: install a signed detector bundle as a NEW version folder, gate it, swap traffic, watch it.

install(bundle):
  [DOWNLOADING]  a URL is fetched with sidecar.download (resumable, size and sha256 checked)
  VERIFYING      free disk checked (DiskSpaceError: nothing extracted or staged), then verify_bundle into
                 <state_dir>/staging (signatures, expiry, rollback, every file's hash); a delta bundle is
                 applied only on top of a committed version's file with the stated base sha256
  STAGING        copied to <model>/.staging-N, renamed to <model>/N (N = highest version folder + 1); the
                 serving folder is never touched; the bundle's config.pbtxt is written only if the model has none
  LOADING        the ensemble stays pinned to the previous version P; the detector is loaded with [P, N]
  HEALTH_GATE    sidecar.health.health_gate on N (warm-up, expected outputs, latency against P)
  COMMITTING     the ensemble is pinned to N (traffic moves now, in one reload), the detector reloaded with
                 [N]; trust.remember(metadata); N joins the committed versions (the last keep_versions)
  PROBATION      sidecar.health.probation on N for probation_s
  DONE           version folders beyond the committed ones are removed
Any failure after STAGING rolls back (ROLLING_BACK -> FAILED): pin P, load only P, remove N's folder; the
bundle is blocked only when the failure verified it bad, not after Triton trouble or a crash (sidecar.blocklist;
rollback and recovery live in sidecar.agent_rollback). Each state is persisted BEFORE its side effects, so
recover() (sidecar.state.RECOVERY) can finish or undo whatever a crash interrupted; every move is checked
against sidecar.state.TRANSITIONS. A rollback requested while an install runs stops it at its next forward
step (_advance), or during probation.

Structured logs: one JSON line per transition on stderr. on_transition(state), when given, is called right
after each state is persisted.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from sidecar.agent_rollback import RollbackMixin
from sidecar.bundle import SignedBundle, verify_bundle
from sidecar.bundle_classes import check_fits_device, unverified_here
from sidecar.download import download
from sidecar.errors import BundleError, DownloadError, HealthGateError, StateError
from sidecar.health import health_gate, probation, stage_thresholds
from sidecar.state import RECOVERY, TERMINAL, AgentState, State, StateStore, check_transition, now_iso
from sidecar.triton_control import TritonControl
from sidecar.trust import TrustStore, metadata_sha256
from sidecar.version_folders import VersionFolders, check_free_space


def served_target(detector_config: dict[str, Any]) -> str:
    """The build target of a rendered detector config: cpu, intel (OpenVINO in the Python backend) or nvidia-gpu."""
    from backends.common.settings import DetectorSettings

    if detector_config.get("backend") != "python" and detector_config.get("platform") != "python":
        return "nvidia-gpu"
    settings = DetectorSettings.from_model_config(detector_config, detector_config.get("name", "the detector"))
    return "intel" if settings.runtime == "openvino" else "cpu"


class AgentBusyError(StateError):
    """Another install, rollback or recovery is running."""


class Agent(RollbackMixin):
    def __init__(self, repository: Path, triton_http_url: str, state_dir: Path, trust: TrustStore, *,
                 detector_model: str = "detect_detector", ensemble_model: str = "detect", keep_versions: int = 3,
                 min_free_bytes: int = 64 << 20, probation_s: float = 60.0, stage: str = "canary",
                 probation_poll_s: float = 0.5, target: str | None = None,
                 device_classes: tuple[str, ...] | None = None, control: TritonControl | None = None,
                 on_transition: Callable[[State], None] | None = None):
        if keep_versions < 2:
            raise ValueError("keep_versions must be at least 2 (the serving version and one to roll back to)")
        self.repository = Path(repository)
        self.model_dir = self.repository / detector_model
        self.folders = VersionFolders(self.model_dir)
        self.detector_model = detector_model
        self.state_dir = Path(state_dir)
        self.staging = self.state_dir / "staging"
        self.downloads = self.state_dir / "downloads"
        self.trust = trust
        self.keep_versions = keep_versions
        self.min_free_bytes = min_free_bytes
        self.probation_s = probation_s
        self.probation_poll_s = probation_poll_s
        self.thresholds = stage_thresholds(stage)
        self.control = control or TritonControl(triton_http_url, self.repository, detector_model, ensemble_model)
        self.on_transition = on_transition
        if device_classes is None:
            from builder.device_class import detect

            device_classes = detect().classes
        self.device_classes = tuple(device_classes)
        self.target = target  # None: the target of the detector the repository serves (served_target)
        self.store = StateStore(self.state_dir / "state.json")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._busy: str | None = None
        self._abort: str | None = None
        self._abort_taken = False
        self.last_error: str | None = None

    # --- reading ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.store.load() or AgentState()
        out = {k: v for k, v in st.to_dict().items() if k not in ("signed", "history", "format", "bad_bundles")}
        out.update(busy=self._busy, current=st.current, stage=self.thresholds.name, last_error=self.last_error,
                   device_classes=list(self.device_classes), target=self.target,
                   bad_bundles=len(st.bad_bundles))
        if st.state not in TERMINAL:
            out["recovery"] = str(RECOVERY[st.state])
        return out

    def history(self) -> list[dict[str, Any]]:
        st = self.store.load()
        return list(st.history) if st else []

    def versions(self) -> dict[str, Any]:
        st = self.store.load() or AgentState()
        previous = st.committed[-2] if len(st.committed) > 1 else None
        return {"current": st.current, "previous": previous, "kept": list(st.committed),
                "on_disk": self.disk_versions(), "candidate": None if st.state in TERMINAL else st.candidate,
                "current_model_version": st.semver(st.current), "previous_model_version": st.semver(previous)}

    def disk_versions(self) -> list[int]:
        return self.folders.versions()

    # --- plumbing ---------------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self, what: str, wait_s: float = 0.0) -> Iterator[None]:
        acquired = self._lock.acquire(timeout=wait_s) if wait_s > 0 else self._lock.acquire(blocking=False)
        if not acquired:
            raise AgentBusyError(f"the agent is busy ({self._busy}); try again later")
        self._busy = what
        try:
            yield
            self.last_error = None
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.control.close()  # no idle connection to Triton in between (it would hold up Triton's exit)
            self._busy = None
            self._lock.release()

    def _log(self, **fields: Any) -> None:
        sys.stderr.write(json.dumps({"ts": now_iso(), "component": "sidecar", **fields}, default=str) + "\n")
        sys.stderr.flush()

    def _load(self) -> AgentState:
        st = self.store.load()
        if st is None or not st.committed:
            versions = self.disk_versions()
            if not versions:
                raise StateError(f"{self.model_dir} has no version folder: nothing is committed to serve")
            st = st or AgentState()
            st.committed = versions[-self.keep_versions:]
            st.note("initialized", committed=st.committed)
            self.store.save(st)
        return st

    def _take_abort(self) -> str | None:
        """The reason of a rollback requested while an install runs, once; the requester then finds it done."""
        if not self._abort:
            return None
        reason, self._abort, self._abort_taken = self._abort, None, True
        return f"rollback requested: {reason}"

    def _advance(self, st: AgentState, new: State, **changes: Any) -> None:
        """A forward step of an install; HealthGateError (the install rolls back) if a rollback was requested."""
        stop = self._take_abort()
        if stop:
            raise HealthGateError(stop)
        self._transition(st, new, **changes)

    def _transition(self, st: AgentState, new: State, **changes: Any) -> None:
        """Move to `new` (StateError if sidecar.state.TRANSITIONS does not allow it), persist, log, notify."""
        old = st.state
        check_transition(old, new)
        for key, value in changes.items():
            setattr(st, key, value)
        st.state = new
        st.note("transition", previous_state=old.value, candidate=st.candidate, reason=st.reason if new in (
            State.FAILED, State.ROLLING_BACK) else None)
        self.store.save(st)
        self._log(event="transition", **{"from": old.value, "to": new.value}, candidate=st.candidate,
                  previous=st.previous, committed=st.committed, reason=st.reason)
        if self.on_transition is not None:
            self.on_transition(new)

    def _check_disk(self, needed: int, folders: tuple[Path, ...] = ()) -> None:
        """needed bytes on each filesystem of `folders` (default: staging and repository, twice on one),
        min_free_bytes left over."""
        check_free_space(folders or (self.state_dir, self.model_dir), needed, self.min_free_bytes)

    def _clean_leftovers(self, st: AgentState) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.folders.clean_leftovers(st.current, st.committed)

    # --- install ----------------------------------------------------------------------------------------

    def install(self, source: str | Path, *, sha256: str | None = None, size: int | None = None) -> dict[str, Any]:
        """Install a bundle file or URL; the status on success, else the SidecarError (after rollback)."""
        source = str(source)
        with self._exclusive(f"install {source}"):
            st = self._load()
            if st.state not in TERMINAL:
                raise StateError(f"an install was interrupted in {st.state.value}: run recover() first")
            self._abort, self._abort_taken = None, False
            prev = st.current
            started = time.monotonic()
            st.bundle, st.previous, st.candidate, st.reason = source, prev, None, None
            st.signed = st.baseline = st.model_version = st.metadata_version = st.failure_kind = None
            st.note("install_started", bundle=source, previous=prev)
            if self.control.pinned_version() != prev or self.control.ready_versions() != [prev]:
                self.control.restore(prev)  # before any new folder exists: never let "latest" pick it up
            bundle = self._verify_and_stage(st, source, sha256, size)
            try:
                self._advance(st, State.LOADING)
                since = self.control.statistics(prev)
                self.control.load_detector([prev, st.candidate])  # the ensemble stays on prev: no traffic moves
                self._advance(st, State.HEALTH_GATE)
                thresholds = self.thresholds
                if unverified_here(bundle.signed, self.device_classes):  # only this gate can vouch for it here
                    thresholds = dataclasses.replace(thresholds, require_expected_outputs=True)
                    st.note("unverified_class", device_classes=list(self.device_classes),
                            verified_on=bundle.device_classes.get("verified_on", []))
                report = health_gate(self.control, st.candidate, prev, bundle.expected_outputs, thresholds,
                                     previous_since=since)
                st.baseline = report.pop("baseline")
                st.note("gate_passed", **report)
                self._advance(st, State.COMMITTING)
                self._commit(st, started)
                self._probation(st)
            except Exception as exc:
                self._rollback_after(st, exc)
                raise
            return self.status()

    def _verify_and_stage(self, st: AgentState, source: str, sha256: str | None, size: int | None) -> SignedBundle:
        try:
            path = Path(source)
            if urlparse(source).scheme in ("http", "https"):
                if not sha256 or size is None:
                    raise DownloadError("installing from a URL needs the bundle's sha256 and size")
                self._advance(st, State.DOWNLOADING)
                name = Path(urlparse(source).path).name or "bundle.tar"
                path = download(source, self.downloads / name, expected_size=int(size), expected_sha256=sha256)
            self._advance(st, State.VERIFYING)
            if not path.is_file():
                raise BundleError(f"bundle {path} does not exist")
            self._check_disk(path.stat().st_size)
            shutil.rmtree(self.staging, ignore_errors=True)
            bases = [self.model_dir / str(v) for v in reversed(st.committed)]  # verified folders only
            target = self.target or served_target(self.control.disk_config(self.detector_model))
            bundle = verify_bundle(path, self.trust, self.staging, base_dirs=bases,
                                   accept=lambda signed: check_fits_device(signed, target, self.device_classes))
            if bundle.model_name != self.detector_model:
                raise BundleError(f"the bundle is for {bundle.model_name}, this agent updates {self.detector_model}")
            sha = metadata_sha256(bundle.signed)
            if sha in st.bad_bundles:
                raise BundleError(f"this bundle was rolled back before ({st.bad_bundles[sha]}); publish a fixed one, "
                                  f"or `edgestack sidecar unblock {sha[:12]}` if it was not the bundle's fault")
            version = max(self.disk_versions() + st.committed) + 1
            st.note("verified", model_version=bundle.version, base_version=bundle.base_version,
                    delivery=bundle.delivery)
            self._advance(st, State.STAGING, candidate=version, signed=bundle.signed,
                          model_version=bundle.version, metadata_version=bundle.metadata_version)
            self._stage(bundle, version)
            return bundle
        except Exception as exc:
            self._discard(st, f"{type(exc).__name__}: {exc}")
            raise

    def _stage(self, bundle: SignedBundle, version: int) -> None:
        self._check_disk(sum(p.stat().st_size for p in bundle.files.values()), (self.model_dir,))
        self.folders.stage(bundle.files, version, bundle.config_pbtxt)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _discard(self, st: AgentState, reason: str) -> None:
        """Undo an install that loaded nothing: staging and the unfinished version folder go; FAILED."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if st.candidate is not None and st.candidate not in st.committed:
            self.folders.remove(st.candidate)
        st.note("install_failed", bundle=st.bundle, reason=reason)
        self._transition(st, State.FAILED, reason=reason)

    def _commit(self, st: AgentState, started: float | None = None) -> None:
        prev, version = st.previous, st.candidate
        if version not in self.control.ready_versions():  # Triton restarted since the gate
            self.control.load_detector([v for v in (prev, version) if (self.model_dir / str(v)).is_dir()])
        pin_start = time.monotonic()
        self.control.pin_ensemble(version)  # traffic moves here, in one ensemble reload
        pin_s = time.monotonic() - pin_start
        self.control.load_detector([version])
        if st.signed:
            self.trust.remember(st.signed)
        committed = ([v for v in st.committed if v != version] + [version])[-self.keep_versions:]
        if st.model_version:
            st.model_versions[str(version)] = st.model_version
        st.note("committed", version=version, previous=prev, pin_s=round(pin_s, 3),
                swap_s=None if started is None else round(time.monotonic() - started, 3))
        self._advance(st, State.PROBATION, committed=committed, model_versions=st.kept_model_versions(committed))

    def _probation(self, st: AgentState) -> None:
        report = probation(self.control, st.candidate, st.baseline, self.thresholds, self.probation_s,
                           self.probation_poll_s, self._take_abort)
        report.pop("thresholds", None)
        st.note("probation_passed", **report)
        self._transition(st, State.DONE, reason=None)
        for version in self.disk_versions():  # garbage: anything not among the last keep_versions good ones
            if version not in st.committed:
                self.folders.remove(version)
        self._clean_leftovers(st)

    # --- trust -------------------------------------------------------------------------------------------

    def update_root(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Rotate the trusted root to the next version (signed by the current root's threshold and its own);
        bundles are checked against it from now on. TrustError (not applied) otherwise."""
        with self._exclusive("update root"):
            signed = self.trust.update_root(envelope)
            st = self.store.load()
            if st is not None:
                st.note("root_updated", root_version=signed["version"], expires=signed["expires"])
                self.store.save(st)
            self._log(event="root_updated", root_version=signed["version"], expires=signed["expires"])
            return {"root_version": signed["version"], "expires": signed["expires"]}
