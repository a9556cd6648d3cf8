"""Errors of the sidecar. Third-party errors (cryptography, tritonclient, urllib, bsdiff4, zstandard)
are mapped to these at the boundary where they occur. SidecarError derives from the project's root,
backends.errors.EdgestackError, which the CLI reports.

SidecarError
 +-- TrustError            metadata cannot be trusted
 |    +-- SignatureError   unknown keys, bad signatures, fewer valid signatures than the threshold
 |    +-- ExpiredError     metadata past its expiry (freeze attack)
 |    +-- RollbackError    metadata older than the newest already trusted (rollback attack)
 +-- BundleError           a bundle is malformed, or a file's size or hash differs from its metadata
 |    +-- GoldenSetError   expected outputs too weak for the gate, or their reference pipeline failed
 +-- DeltaError            a delta does not apply: wrong base, corrupt delta, result hash differs
 +-- DownloadError         a download failed after its bounded number of tries
 +-- DiskSpaceError        not enough free disk to stage a version
 +-- TritonControlError    Triton refused or failed a repository/inference call
 |    +-- TritonUnavailableError  Triton did not answer: connection refused or reset, timeout
 +-- HealthGateError       a staged version failed the health gate (warm-up, expected outputs, latency)
 |    +-- GateInconclusiveError  the gate could not decide (latency too noisy): not a verdict on the bundle
 +-- BlocklistError        no blocked bundle matches (or several do) what `unblock` names
 +-- StateError            the persisted state file is unreadable or inconsistent
"""
from backends.errors import EdgestackError


class SidecarError(EdgestackError):
    """Base of the sidecar's errors."""


class TrustError(SidecarError):
    """Metadata cannot be trusted."""


class SignatureError(TrustError):
    """Signatures are missing, invalid, from unknown keys, or below the threshold."""


class ExpiredError(TrustError):
    """Metadata has expired."""


class RollbackError(TrustError):
    """Metadata is older than what was already trusted."""


class BundleError(SidecarError):
    """A bundle is malformed or its contents differ from its signed metadata."""


class GoldenSetError(BundleError):
    """A golden set (expected outputs) is too weak for the health gate, or the reference could not make it."""


class DeltaError(SidecarError):
    """A delta cannot be applied or its result does not verify."""


class DownloadError(SidecarError):
    """A download failed after the allowed tries."""


class DiskSpaceError(SidecarError):
    """Not enough free disk space to stage a version."""


class TritonControlError(SidecarError):
    """Triton refused or failed a control or inference call."""


class TritonUnavailableError(TritonControlError):
    """Triton did not answer (connection refused or reset, timeout): nothing was learned about the model."""


class HealthGateError(SidecarError):
    """A staged version failed its health gate; `reason` says which check."""


class GateInconclusiveError(HealthGateError):
    """The gate could not tell whether the version is good (e.g. latency too noisy to decide)."""


class BlocklistError(SidecarError):
    """No blocked bundle, or more than one, matches the sha256 prefix given."""


class StateError(SidecarError):
    """The persisted state is unreadable or inconsistent."""
