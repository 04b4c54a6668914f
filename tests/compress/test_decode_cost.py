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


def test_longer_blocks_cost_less_at_accuracy_level_4():
    """The level-4 kernel scales each block once: per weight, a longer block never costs more and
    b128 costs clearly less than b32, as a Linear and as a tied LM head; level 0 keeps one entry
    per family."""
    for n, k in ((1536, 576), (49152, 576)):
        for fam, blocks in (("int4", (16, 32, 64, 128)), ("int8", (32, 64, 128))):
            cost = [candidate_cost_us(Candidate(FormatSpec.parse(f"{fam}_b{b}")), n, k) for b in blocks]
            assert cost == sorted(cost, reverse=True) and cost[-1] < 0.85 * cost[blocks.index(32)]
    a0 = [candidate_cost_us(Candidate(FormatSpec.parse(f"int4_b{b}")), 1536, 576, accuracy_level=0) for b in (32, 128)]
    assert a0[0] == a0[1]
    # an unmeasured block costs what the nearest measured one does
    assert candidate_cost_us(Candidate(FormatSpec.parse("int8_b16")), 1536, 576) == candidate_cost_us(
        Candidate(FormatSpec.parse("int8_b32")), 1536, 576)


def test_int8_and_float_cost_their_bytes_in_a_model():
    """Inside a decoder the weights stream from memory: int8 costs more than int4 at the same block,
    as a Linear and as a tied LM head, and a float head far more."""
    def per_weight(fmt, n, k):
        return candidate_cost_us(Candidate(FormatSpec.parse(fmt)), n, k) / (n * k)
    for shape in ((1536, 576), (49152, 576)):
        for b in (32, 64, 128):
            assert per_weight(f"int8_b{b}", *shape) > 1.1 * per_weight(f"int4_b{b}", *shape)
    assert per_weight("fp16", 49152, 576) > 4 * per_weight("int4_b32", 49152, 576)
    assert per_weight("fp16", 1536, 576) > 2 * per_weight("int4_b32", 1536, 576)


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


def test_decode_bound_moves_int4_to_longer_blocks(tiny_llama_dir, tmp_path):
    """Among int4 formats alone the error prefers short blocks; a decode bound below that plan's
    estimate buys speed with longer ones (the level-4 kernel's per-block cost), within the bound."""
    rc, free = _compress(tiny_llama_dir, tmp_path / "free", "--budget", "6", "--formats", "int4")
    assert rc == 0
    bound = free["decode_ms_estimate"] * 0.9
    rc, fast = _compress(tiny_llama_dir, tmp_path / "fast", "--budget", "6", "--formats", "int4",
                         "--max-decode-ms", f"{bound}")
    assert rc == 0 and fast["decode_ms_estimate"] <= bound
    assert fast["formats"].get("int4_b128", 0) > free["formats"].get("int4_b128", 0)
    assert fast["total_error"] > free["total_error"]


@pytest.mark.parametrize("argv", [["--method", "rtn", "--budget", "4", "--max-decode-ms", v] for v in ("0", "-1", "nan", "inf")]
                         + [["--method", "gptq", "--table", "int9_b32"], ["--method", "gptq", "--max-decode-ms", "5"]])
def test_bad_decode_bound_or_table_is_one_line_before_any_work(tiny_llama_dir, tmp_path, capsys, argv):
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["compress", str(tiny_llama_dir), "-o", str(tmp_path / "ck"), "--workers", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert not (tmp_path / "ck").exists()
