"""``compress --method gptq --budget-mb``: the ILP picks one format per matrix (the token table too),
GPTQ computes the codes in those formats, the bytes are the plan's and the file runs in onnxruntime."""

from collections import Counter

import numpy as np
import pytest
import torch

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.compress.calibrated_plan import plan_formats
from quantseal.export.decoder import float_reference_logits
from tests.cli_run import last_json, run

BUDGET_MB = 1.42  # tiny LLaMA: the smallest feasible plan is 1.385 MB; at 1.42 int4 and int8 both occur


@pytest.fixture(scope="module")
def planned(tiny_llama_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gptq_plan") / "ck"
    try:
        rc, stdout, err = run(["compress", tiny_llama_dir, "-o", out, "--method", "gptq", "--budget-mb", BUDGET_MB,
                               "--formats", "int4_b32,int8_b32", "--calib-samples", "16", "--workers", "1", "--json"])
        assert rc == 0, err
        yield out, last_json(stdout)
    finally:
        torch.set_num_threads(threads)


def test_formats_are_the_ilps_and_bytes_the_plans(planned, tiny_llama_dir):
    out, report = planned
    manifest, tensors = read_checkpoint(out)
    fplan = plan_formats(tiny_llama_dir, BUDGET_MB, ("int4_b32", "int8_b32"), calib_samples=16)
    assert {n: e.format for n, e in manifest.matrices.items()} == {n: f.name for n, f in fplan.formats.items()}
    linear_formats = {e.format for e in manifest.matrices.values() if e.kind == "linear"}
    assert linear_formats == {"int4_b32", "int8_b32"}  # the budget buys int8 for some matrices, not all
    assert sum(e.bytes for e in manifest.matrices.values()) == fplan.planned_bytes
    for name, e in manifest.matrices.items():  # every entry's bytes are its stored tensors'
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                     if k.startswith(name + ".") and k[len(name) + 1:] in ("qweight", "scales", "qzeros", "weight"))
        assert stored == e.bytes, name
    assert manifest.matrices[fplan.table].kind == "embedding" and manifest.extra["table_method"] == "gptq"
    assert manifest.budget["kind"] == "mb" and manifest.extra["plan"]["planned_bytes"] == fplan.planned_bytes
    assert report["formats"] == dict(sorted(Counter(e.format for e in manifest.matrices.values()).items()))


def test_planned_checkpoint_exports_and_matches_torch(planned, tmp_path):
    from quantseal.runtime.pipelines import CausalLM

    out, _ = planned
    rc, stdout, err = run(["export", out, "-o", tmp_path / "onnx" / "model.onnx", "--accuracy-level", "0", "--json"])
    assert rc == 0, err
    # the plan gave each layer's q/k/v one format (compress/pack_groups.py), so the export packs them:
    # per layer qkv, o, gate, up, down, and the tied head
    assert last_json(stdout)["ops"]["MatMulNBits"] == 2 * 5 + 1
    model, _, _ = load_compressed(out)
    lm = CausalLM(tmp_path / "onnx" / "model.onnx", provider="cpu")
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012]])
    ref = float_reference_logits(model, ids, np.ones_like(ids))
    got = lm.logits(ids, np.ones_like(ids))
    scale = np.abs(ref).max()
    assert scale > 0.01 and np.abs(got - ref).max() <= 1e-4 * scale


@pytest.mark.parametrize("argv,needle", [
    (["--table", "int4_b32"], "drop --table"),
    (["--formats", "int4_b32,fp16"], "integer formats"),
    (["--method", "cbq", "--init", "rtn"], "--init gptq"),
])
def test_bad_plan_arguments_are_one_line(tiny_llama_dir, tmp_path, argv, needle):
    args = ["compress", tiny_llama_dir, "-o", tmp_path / "ck", "--method", "gptq", "--budget-mb", "1.5", *argv]
    rc, _, err = run(args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "ck").exists()
