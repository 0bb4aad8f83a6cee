"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""


class KVTunerError(Exception):
    """A problem with the user's input (file, field, flag): print the message, exit 2."""


class ConfigError(KVTunerError):
    """A precision config, search space or sensitivity file is missing or invalid."""


class ModelError(KVTunerError):
    """A model name or path cannot be resolved or loaded."""
