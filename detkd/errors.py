"""The errors that reach the user, in one module that imports nothing (not even torch), so that the CLI
can catch them without importing the layers that raise them. Each module that raises one re-exports it
(``detkd.runtime.checkpoint.CheckpointError``, ``detkd.data.DataError``, ...); ``ConfigError`` stays in
:mod:`detkd.config`, which the CLI imports anyway."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class DataError(ValueError):
    """Bad input data. The message names the file and the entry (image id, file name, annotation id)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A file the data set needs (annotation file, image set list, image) does not exist."""


class RunStopped(RuntimeError):
    """The run stopped itself with a message for the user (the CLI prints it and exits with status 1)."""


class NonFiniteLossError(RunStopped):
    """Too many consecutive steps produced a NaN/Inf loss, or the weights themselves became NaN/Inf."""


class DistributedError(RunStopped):
    """A collective operation failed: another rank died, or did not answer within ``train.dist_timeout_s``."""


class BenchError(RuntimeError):
    """A run of the bench failed; its log names the cause."""
