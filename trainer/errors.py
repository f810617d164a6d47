"""User errors: one sentence on stderr, exit code 2, no traceback.

Anything a user can cause by a config, a data file or a command line raises `UserError`; the
entry point prints it as one line and exits 2. Bugs stay ordinary exceptions with tracebacks.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input. `where` names the key, file or file:line."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} (hint: {self.hint})" if self.hint else text
