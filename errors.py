"""The errors scPretrain reports as one line (no traceback) and their exit status; importing does nothing.

- ``DataError``: an input file or value is wrong (the message names the file, the defect and the fix);
- ``OutputError``: an output cannot be written where asked (a folder, no permission, a full disk,
  or the same file as one of the run's inputs);
- ``CheckpointError``: a checkpoint is missing, damaged, of the wrong kind or inconsistent.

All three exit with status 1 from a script (argparse uses 2, an interruption 130).
"""
from __future__ import annotations


class ScpretrainError(ValueError):
    """An error whose message is complete for the user: scripts print it as one line and exit 1."""


class DataError(ScpretrainError):
    """Bad input data: the message names the file and what is wrong with it."""


class OutputError(ScpretrainError):
    """An output path that cannot be written, or that would overwrite one of the run's inputs."""


class CheckpointError(ScpretrainError):
    """A checkpoint that is missing, damaged, of the wrong kind or inconsistent with itself."""
