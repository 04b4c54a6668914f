"""The decode-cost model and the plan's decode-time bound (``compress --max-decode-ms``)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from quantseal.cli import main
from quantseal.compress.decode_cost import candidate_cost_us
from quantseal.compress.formats import Candidate, FormatSpec


def test_cost_model_orders_the_kernels_as_measured():
    n, k = 1536, 576
    cost = {f: candidate_cost_us(Candidate(FormatSpec.parse(f)), n, k)
            for f in ("int4_b32", "int4f_b32", "int8_b64", "nf4_b64", "fp16")}
    assert cost["int4_b32"] < cost["nf4_b64"] and cost["int8_b64"] < cost["fp16"]
    # int4f: int4's kernel plus the block-sum correction (~1.2x), still well under a float matrix
    assert 1.1 * cost["int4_b32"] < cost["int4f_b32"] < 1.4 * cost["int4_b32"] < cost["fp16"]
    # a low-rank branch adds two float32 products of r·(N + K) weights
    branch = candidate_cost_us(Candidate(FormatSpec.parse("int4_b32"), 16), n, k) - cost["int4_b32"]
    assert branch == pytest.approx(candidate_cost_us(Candidate(FormatSpec.parse("fp32")), 16, n + k))
    # at accuracy level 0 an 8-bit matrix is the slow path
    slow = candidate_cost_us(Candidate(FormatSpec.parse("int8_b64")), n, k, accuracy_level=0)
    assert slow > 20 * cost["int8_b64"]


def _compress(model_dir, out, *extra):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compress", str(model_dir), "-o", str(out), "--method", "rtn", "--workers", "1", "--json", *extra])
    return rc, (json.loads(buf.getvalue().strip().splitlines()[-1]) if rc == 0 else None)


def test_decode_bound_steers_the_plan_off_slow_kernels(tiny_llama_dir, tmp_path, capsys):
    """At a generous byte budget the plan takes fp16 (least error); bounding the decode time moves
    it onto the fast integer kernels, within the bound."""
    rc, free = _compress(tiny_llama_dir, tmp_path / "free", "--budget", "16", "--formats", "int4,nf4,fp16")
    assert rc == 0 and free["formats"].get("fp16", 0) > 0
    bound = free["decode_ms_estimate"] * 0.6
    rc, fast = _compress(tiny_llama_dir, tmp_path / "fast", "--budget", "16", "--formats", "int4,nf4,fp16",
                         "--max-decode-ms", f"{bound}")
    assert rc == 0
    assert fast["decode_ms_estimate"] <= bound < free["decode_ms_estimate"]
    assert fast["total_error"] > free["total_error"]
    capsys.readouterr()
    rc, _ = _compress(tiny_llama_dir, tmp_path / "never", "--budget", "16", "--max-decode-ms", "1e-6")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "fastest plan" in err[0]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv", [["--method", "rtn", "--budget", "4", "--max-decode-ms", v] for v in ("0", "-1", "nan", "inf")]
                         + [["--method", "gptq", "--table", "int9_b32"], ["--method", "gptq", "--max-decode-ms", "5"]])
def test_bad_decode_bound_or_table_is_one_line_before_any_work(tiny_llama_dir, tmp_path, capsys, argv):
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["compress", str(tiny_llama_dir), "-o", str(tmp_path / "ck"), "--workers", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert not (tmp_path / "ck").exists()
