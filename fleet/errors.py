"""Errors of the fleet. FleetError derives from the project's root, backends.errors.EdgestackError.

FleetError
 +-- ProtocolError     a document on the bus (desired state, registration, report, rollout) is malformed
 |                     or out of range; the controller counts it against the device and goes on
 +-- TransportError    NATS could not be reached, a bucket or stream is missing, a write lost its race
 |    +-- ConflictError   a compare-and-set write found a newer revision (someone else wrote first)
 +-- RegistryError     the model registry refused, or a model version, bundle or alias does not exist
 +-- StrategyError     a rollout strategy file is invalid (field, value, what fits)
 +-- RolloutError      a rollout command is not legal in the rollout's state, or the rollout is unknown
"""
from backends.errors import EdgestackError


class FleetError(EdgestackError):
    """Base of the fleet's errors."""


class ProtocolError(FleetError):
    """A document on the bus is malformed or out of range."""


class TransportError(FleetError):
    """The messaging engine failed or refused."""


class ConflictError(TransportError):
    """A compare-and-set write lost: the key has a newer revision."""


class RegistryError(FleetError):
    """The model registry refused, or what was asked for does not exist."""


class StrategyError(FleetError):
    """A rollout strategy is invalid."""


class RolloutError(FleetError):
    """A rollout command is not legal now, or the rollout does not exist."""
