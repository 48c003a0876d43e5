"""The project's own error types: a user's mistake, named in one line.

Everything a user can get wrong (a flag, a data file, a checkpoint, a work directory)
raises a subclass of ``DNRError`` whose message names the place (file, line, column,
flag, field) and the problem in one line. The binaries print that line and exit
non-zero, without a traceback; anything else escaping is a bug in the project and
keeps its traceback.
"""


class DNRError(Exception):
  """Base class: a problem the user can fix; the message says what and where."""


class ConfigError(DNRError, ValueError):
  """A flag or config field has a bad value, or settings contradict each other."""


class DataError(DNRError, ValueError):
  """A data file is missing, malformed or inconsistent (the message says where)."""


class CheckpointError(DNRError):
  """A checkpoint is missing, damaged, or belongs to a different configuration."""


class TrainingDiverged(DNRError):
  """Training produced non-finite losses or parameters and was stopped."""


class Interrupted(DNRError):
  """SIGTERM or SIGINT stopped training; a checkpoint was saved and a rerun resumes."""
