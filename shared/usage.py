"""Exit codes of the ``realscore`` command and the exception for a usage or configuration error.

Kept apart from :mod:`shared.cli` so the torch-free pre-flight checks and the command modules can
raise :class:`UsageError` without importing the command line itself.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def model_stopped(command: str, error: BaseException, kept: str = "") -> str:
    """The one line a command ends with when its in-process model breaks mid-run (a sticky device
    error, a hung forward): what broke and what was kept (exit code 1 goes with it)."""
    return f"realscore {command}: the model stopped working ({error})" + (f"; {kept}" if kept else "")


class UsageError(Exception):
    """Bad arguments or configuration: printed as one line, exit code 2."""
