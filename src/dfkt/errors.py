"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class DfktError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ConfigError(DfktError):
    """A config file, preset or override is invalid."""


class UnknownNameError(DfktError, KeyError):
    """A method, model or dataset name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DatasetUnavailableError(DfktError):
    """A dataset's files are missing and cannot be downloaded."""


class ModelFileError(DfktError):
    """A model file is missing, corrupt, or does not fit the data."""


class TrainingDivergedError(DfktError):
    """A loss became inf or NaN."""
