"""Errors raised by the builder package.

BuilderError
 +-- SpecError     a pipeline spec is invalid
 +-- ConfigError   a model configuration does not fit Triton's schema or our rules
 +-- TargetError   an accelerator target profile is invalid or unusable here

BuilderError derives from the project's root, backends.errors.EdgestackError, which the CLI reports.
"""
from backends.errors import EdgestackError


class BuilderError(EdgestackError):
    """Base of every error the builder raises on purpose."""


class SpecError(BuilderError):
    """A pipeline spec is invalid."""


class ConfigError(BuilderError):
    """A model configuration does not fit Triton's schema or our rules."""


class TargetError(BuilderError):
    """An accelerator target profile is invalid or unusable on this machine."""
