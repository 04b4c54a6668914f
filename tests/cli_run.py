"""Run the real command line in-process: ``run(argv) -> (exit code, stdout, stderr)``."""

from __future__ import annotations

import contextlib
import io
import json

from quantseal.cli import main


def run(argv) -> tuple[int, str, str]:
    """``quantseal ARGV`` (items turned into strings), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def last_json(text: str):
    """The JSON object ``--json`` prints as the last stdout line."""
    return json.loads(text.strip().splitlines()[-1])
