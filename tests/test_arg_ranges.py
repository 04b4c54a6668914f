"""quantseal/arg_ranges.py: every numeric flag of every command has a range, and every error
message is one printable line."""

import pytest

from quantseal.arg_ranges import FLOAT_RANGES, INT_RANGES, check_ranges, one_line
from quantseal.cli import build_parser
from quantseal.errors import BadInput


def _numeric_dests():
    """(command path, dest, type) of every int/float option of the real parser."""
    out = []

    def walk(parser, path):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):  # sub-commands
                for name, sub in action.choices.items():
                    walk(sub, path + (name,))
            elif action.type in (int, float) and action.choices is None:
                out.append((path, action.dest, action.type))

    walk(build_parser(), ())
    return out


def test_every_numeric_flag_has_a_range():
    """No int/float option escapes the table (``bits`` is checked by the registry's own rule)."""
    dests = _numeric_dests()
    assert len(dests) > 30
    missing = [(p, d) for p, d, t in dests if d not in INT_RANGES and d not in FLOAT_RANGES and d != "bits"
               and d != "block"]  # --block: calibrated.BLOCK_SIZES, a set not a range
    assert missing == []


@pytest.mark.parametrize("argv, word", [
    (["compress", "-o", "x", "--budget-mb", "inf"], "--budget-mb"),
    (["compress", "-o", "x", "--budget", "nan"], "--budget"),
    (["compress", "-o", "x", "--budget", "4", "--calib-samples", "-5"], "--calib-samples"),
    (["compress", "-o", "x", "--budget", "4", "--workers", "0"], "--workers"),
    (["compress", "-o", "x", "--budget", "4", "--seed", "-1"], "--seed"),
    (["compress", "-o", "x", "--budget", "4", "--ranks", "0,5000"], "--ranks"),
    (["serve", "m.onnx", "--port", "70000"], "--port"),
    (["run", "m.onnx", "--text", "a", "--threads", "0"], "--threads"),
    (["registry", "add", "r.db", "--key", "k", "--user", "a", "--bits", "100000000"], "16..1024"),
    (["board", "train", "ck", "-o", "b", "--key", "k", "--bits", "12"], "--bits"),
    (["board", "train", "ck", "-o", "b", "--key", "k", "--rank", "0"], "--rank"),
    (["board", "train", "ck", "-o", "b", "--key", "k", "--time-limit", "0"], "--time-limit"),
    (["board", "train", "ck", "-o", "b", "--key", "k", "--time-limit", "inf"], "--time-limit"),
    (["verify", "s.onnx", "--board", "b", "--key", "k", "--registry", "r", "--alpha", "1"], "--alpha"),
])
def test_out_of_range_refused_naming_the_flag(argv, word):
    args = build_parser().parse_args(argv)
    with pytest.raises(BadInput, match=word):
        check_ranges(args)


@pytest.mark.parametrize("argv", [
    ["compress", "-o", "x", "--budget", "32", "--seed", str(2**63 - 1), "--calib-samples", "1"],
    ["compress", "-o", "x", "--budget-mb", "1e-3"],
    ["serve", "m.onnx", "--port", "0"],
    ["board", "train", "ck", "-o", "b", "--key", "k", "--bits", "8"],  # a board may be smaller than a registry
    ["compress", "-o", "x", "--method", "cbq", "--rank", "0"],  # cbq: learned scales only
])
def test_edges_accepted(argv):
    check_ranges(build_parser().parse_args(argv))


@pytest.mark.parametrize("text, want", [
    ("a\nb", "a\\nb"), ("caf\udce9", "caf\\udce9"), ("\x1b[31mred", "\\x1b[31mred"), ("tab\there", "tab\\there"),
    ("  ", "error"), ("plain é ∞", "plain é ∞"),
])
def test_one_line(text, want):
    assert one_line(text) == want
    assert "\n" not in one_line(text)
    one_line(text).encode("utf-8")  # writable as UTF-8

