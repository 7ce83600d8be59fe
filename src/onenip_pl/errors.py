"""Exceptions that stop a run with a message a user can act on."""


class OneNIPError(Exception):
    """Base class of the package's own errors."""


class DataError(OneNIPError, ValueError):
    """A data set, image or mask is missing, unreadable or inconsistent."""


class ConfigError(OneNIPError, ValueError):
    """A configuration value is invalid; the message names the setting."""


class CheckpointError(OneNIPError, ValueError):
    """A checkpoint file is unsafe, incompatible or has unexpected keys."""
