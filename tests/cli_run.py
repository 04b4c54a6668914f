"""Run the real command line in-process: ``run(argv) -> (exit code, stdout, stderr)``."""

from __future__ import annotations

import contextlib
import io
import json

from quantseal.cli import main


def run(argv) -> tuple[int, str, str]:
    """``quantseal ARGV`` (items turned into strings), its output captured; argparse's usage
    errors (``SystemExit``) give their exit code, as the real process does."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def last_json(text: str):
    """The JSON object ``--json`` prints as the last stdout line."""
    return json.loads(text.strip().splitlines()[-1])


def compress_then_export(model_dir, ck, out, compress_args, accuracy_level: int = 0) -> None:
    """``quantseal compress MODEL -o CK ARGS --json`` then ``quantseal export CK -o OUT
    --accuracy-level L --json``, each asserted to succeed (its stderr in the message)."""
    rc, _, err = run(["compress", model_dir, "-o", ck, *compress_args, "--json"])
    assert rc == 0, err
    rc, _, err = run(["export", ck, "-o", out, "--accuracy-level", accuracy_level, "--json"])
    assert rc == 0, err
