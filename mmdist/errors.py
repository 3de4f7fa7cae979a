"""Errors that the CLI turns into one clear line instead of a traceback."""


class MmdistError(Exception):
    """Base class: something the user can fix (bad config, bad data, missing artifact)."""


class ConfigError(MmdistError):
    """A config field is unknown, of the wrong type or out of range."""


class DataError(MmdistError):
    """Input data is missing, empty, malformed or inconsistent."""


class ArtifactError(MmdistError):
    """An artifact is missing, incomplete, or was made by a different config or model."""
