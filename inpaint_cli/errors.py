"""The one exception type users see: a single line naming the file and the problem, and the
launcher facts that decide which process of a launched job says it."""

from __future__ import annotations

import os


def printable(text: str) -> str:
    """`text` with control characters escaped: a newline in a file name must not turn one
    message into two (or forge a line of a log that scripts parse)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class InpaintError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    `exit_code` follows the CLI convention: 2 for bad usage (options, paths), 1 for failures.
    `every_rank`: every process of a launched job meets the same error, so one says it.
    """

    def __init__(self, message: str, exit_code: int = 2, every_rank: bool = False) -> None:
        super().__init__(printable(message))
        self.exit_code = exit_code
        self.every_rank = every_rank


def launched_processes() -> int:
    """The number of processes `accelerate launch` or torchrun started (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_another_rank() -> bool:
    """A process of a launched job other than the first."""
    return launched_processes() > 1 and os.environ.get("RANK", "0") != "0"
