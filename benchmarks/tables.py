"""What the hand-run benchmark scripts share: the command line that produced a table, and printing the table (and
writing it where asked)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """This run's command, quoted as a shell would take it, in Markdown code."""
    return f"`{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`"


def emit(lines: list[str], out: Path | None) -> None:
    """Print the Markdown `lines` and, given `out`, write them there too."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
