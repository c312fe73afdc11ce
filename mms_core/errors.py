"""Errors a user can act on. Each message names the problem and the fix."""


class MMSError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class DataError(MMSError):
    """The input data is unusable (missing column, non-numeric feature, empty file, NaN)."""


class CorruptShardError(DataError):
    """A shard's bytes do not match the checksum recorded in its manifest."""


class ModelLoadError(MMSError):
    """A model could not be built or loaded (bad import path, wrong return type)."""


class SpecError(MMSError):
    """A pipeline spec or override is invalid."""


class TrainingError(MMSError):
    """Distributed training could not run (no workers, a rank failed, a timeout)."""


class MeteringError(MMSError):
    """An API key or quota setting is invalid, or the metering database cannot be used."""


class RetentionError(MMSError):
    """A retention policy is invalid or would delete something protected (an aliased version)."""


class MonitoringError(MMSError, ValueError):
    """Monitoring cannot run: a threshold out of range, no training statistics or live ones, an
    unreachable server. Also a ValueError, so a pydantic validator raising it reports it as invalid."""
