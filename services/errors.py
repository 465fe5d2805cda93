"""Errors that carry a message meant for the user, one line each."""


class MedhashError(Exception):
    """A problem the user can act on; the CLI prints its message without a traceback."""


class ConfigError(MedhashError):
    """A configuration file or value is wrong."""


class DataError(MedhashError):
    """A dataset, file or item cannot be read."""


class WeightsError(MedhashError):
    """Pretrained weights are missing or cannot be loaded."""
