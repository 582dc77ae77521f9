"""The one exception type users see: a single line naming the file and the problem."""

from __future__ import annotations


class InpaintError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    `exit_code` follows the CLI convention: 2 for bad usage (options, paths), 1 for failures.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
