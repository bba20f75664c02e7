"""Errors a user can fix, apart from bugs.

:class:`UserError` is raised where a config key, a command-line flag, a file or an input is wrong; its message is one
line naming the key/flag/file and what was expected. It subclasses ``ValueError``, so callers that catch
``ValueError`` keep working. The command lines (:mod:`lmfusion.cli`, :mod:`lmfusion.training.cli`) print
:data:`USER_ERRORS` as that one line (exit status 2); any other exception, a ``ValueError`` or ``AssertionError`` from
deep inside included, is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "USER_ERRORS"]


class UserError(ValueError):
    """Bad input the user can fix: the message is one line naming where and what was expected."""


# A missing or already existing path named on the command line or in a config is the user's to fix too.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)
