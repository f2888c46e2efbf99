"""Entry-point plumbing shared by the binaries: one-line errors and list flags.

A binary's `main` raises; `run` turns the expected error kinds (bad traces, bad values, missing
files) into a single line on stderr naming the thing at fault, and exit status 2 — no
traceback for a user's mistake. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app

from simfluence_jax.traces.contract import TraceError

USER_ERRORS = (TraceError, ValueError, FileNotFoundError, KeyError)


def one_line(error: BaseException) -> str:
  text = str(error).strip().replace("\n", " ")
  if isinstance(error, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1]
  return f"{type(error).__name__}: {text}"


def run(main: Callable[[list[str]], None], prog: str, *, flags_parser=None) -> None:
  """absl.app.run(main) with user errors reported as one line and exit status 2."""

  def guarded(argv):
    try:
      main(argv)
    except USER_ERRORS as e:
      print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
      sys.exit(2)

  if flags_parser is None:
    app.run(guarded)
  else:
    app.run(guarded, flags_parser=flags_parser)
