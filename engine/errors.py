"""Exception types a user can act on. Each message says what was expected, what was found, what to do."""

from __future__ import annotations


class VadeError(Exception):
    """Base of every error vade raises on purpose."""


class ConfigError(VadeError):
    """A configuration key or value is invalid."""


class WeightsError(VadeError):
    """Backbone weights are missing or do not fit the backbone."""


class ModelFileError(VadeError):
    """A model directory is missing, truncated, tampered with or of the wrong kind."""


class DecodeError(VadeError):
    """One image could not be read; becomes an error row in a scan."""


class DataError(VadeError):
    """A dataset folder does not have the expected layout or holds no usable images."""
