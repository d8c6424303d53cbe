"""One-line errors for the command-line entry points (train, generate, data).

A user's mistake (a bad config field, a missing or malformed file, a busy workdir) is reported as one
line on stderr, `<prog>: error: <message>`, with a non-zero exit; the traceback is for developers
and shows only with `--verbose` on the command line or SSM_LAB_VERBOSE=1 in the environment.
Exceptions outside `USER_ERRORS` are bugs and keep their traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

# ValueError covers ConfigError, json.JSONDecodeError and UnicodeDecodeError; OSError covers missing
# and unreadable files (its message names the file); FloatingPointError is a diverged run.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)

EXIT_USER_ERROR = 2


def verbose(argv: Sequence[str] | None = None) -> bool:
  """Whether tracebacks were asked for (`--verbose` in argv, or SSM_LAB_VERBOSE set non-empty)."""
  argv = sys.argv if argv is None else argv
  return "--verbose" in argv or os.environ.get("SSM_LAB_VERBOSE", "") not in ("", "0")


def strip_verbose(argv: Sequence[str]) -> list[str]:
  """argv without `--verbose` (for parsers that do not define it)."""
  return [a for a in argv if a != "--verbose"]


def one_line(err: BaseException) -> str:
  """The exception's message on one line (newlines and runs of spaces folded)."""
  text = str(err) or type(err).__name__
  return " ".join(text.split())


def fail(prog: str, message: str, *, code: int = EXIT_USER_ERROR) -> NoReturn:
  sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
  sys.stderr.flush()
  sys.exit(code)


def run(prog: str, fn: Callable[[], int | None], *, argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
  """Calls fn(); a user error becomes one stderr line and exit status 2 (a traceback too when
  verbose). Returns fn's status (0 for None)."""
  try:
    return fn() or 0
  except errors as err:
    if verbose(argv):
      traceback.print_exc()
    fail(prog, one_line(err))
