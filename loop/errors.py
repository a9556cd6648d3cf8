"""Errors of the learning loop. LoopError derives from the project's root, backends.errors.EdgestackError.

LoopError
 +-- SamplingError    the spec's sampling section or a sampler setting is invalid (names the field)
 +-- SpoolError       the spool folder cannot be used, or a spooled sample is malformed
 +-- SampleError      a sample message from a device does not parse (names the field); the collector skips it
 +-- PromotionError   a promotion cannot be decided (unknown version, no metric to compare)
"""
from backends.errors import EdgestackError


class LoopError(EdgestackError):
    """Base of the learning loop's errors."""


class SamplingError(LoopError):
    """A sampling setting is invalid."""


class SpoolError(LoopError):
    """The spool cannot be used or holds a malformed sample."""


class SampleError(LoopError):
    """A sample message does not parse."""


class PromotionError(LoopError):
    """A promotion cannot be decided."""
