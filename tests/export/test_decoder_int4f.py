"""int4f (float block offsets, ``w = s·q + m``) in a decoder export: every matrix and the tied
table as MatMulNBits / GatherBlockQuantized + the block-sum correction; onnxruntime's logits equal
the torch model of the dequantised weights, and onnxruntime-genai runs the folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from quantseal.checkpoint import entry_bytes, load_compressed, read_checkpoint
from quantseal.compress.pipeline import one_torch_thread
from quantseal.export.decoder import float_reference_logits
from quantseal.runtime.pipelines import CausalLM

from cli_run import compress_then_export, last_json, run  # tests/cli_run.py
from genai_greedy import og_greedy  # tests/export/genai_greedy.py


@pytest.fixture(scope="module")
def int4f_export(tmp_path_factory, tiny_llama_sharp_dir):
    """The sharpened tiny LLaMA, every matrix and the tied table in int4f_b32 (``--budget-mb 1.7``
    plans the table too), exported at accuracy level 0: (checkpoint, report, torch model, CausalLM)."""
    root = tmp_path_factory.mktemp("llama_int4f")
    ck = root / "ck"
    with one_torch_thread():
        rc, _, err = run(["compress", tiny_llama_sharp_dir, "-o", ck, "--method", "rtn", "--workers", "1",
                          "--budget-mb", "1.7", "--formats", "int4f_b32", "--json"])
        assert rc == 0, err
        rc, out, err = run(["export", ck, "-o", root / "onnx" / "model.onnx", "--json", "--accuracy-level", "0"])
        assert rc == 0, err
        model, _, _ = load_compressed(ck)
    report = last_json(out)
    return ck, report, model, CausalLM(report["path"], provider="cpu")


def test_checkpoint_stores_codes_scales_and_offsets_at_5_bits(int4f_export):
    ck, _, _, _ = int4f_export
    manifest, tensors = read_checkpoint(ck)
    assert {e.format for e in manifest.matrices.values()} == {"int4f_b32"}
    assert "model.embed_tokens" in manifest.matrices and "lm_head.weight" not in tensors
    for name, e in manifest.matrices.items():
        n, k = e.shape
        nb = -(-k // 32)
        assert tensors[f"{name}.offsets"].dtype == torch.float16 and tuple(tensors[f"{name}.offsets"].shape) == (n, nb)
        assert f"{name}.qzeros" not in tensors
        assert e.bytes == entry_bytes(name, tensors) == n * nb * (16 + 2 + 2)  # 4 + 16/32 + 16/32 bits


def test_graph_shares_one_block_sum_per_input(int4f_export):
    _, report, _, _ = int4f_export
    assert Path(report["path"]).stat().st_size <= 1.7e6  # --budget-mb bounds the file, int4f's nodes included
    proto = onnx.load(report["path"])
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 3 for n in nbits)  # no zero points: z = 8, the offsets go to S(x)·M'ᵀ
    # per layer: packed q/k/v, o, gate+up (one shared S(x)), down; plus the head
    assert len(nbits) == 2 * (1 + 1 + 2 + 1) + 1
    sums = [n for n in proto.graph.node if n.op_type == "ReduceSum" and ".bsum32" in n.output[0]]
    assert len(sums) == 2 * 4 + 1
    assert sum(n.op_type == "GatherBlockQuantized" for n in proto.graph.node) == 1
    users = sorted(n.op_type for n in proto.graph.node if "model.embed_tokens.qweight" in n.input)
    assert users == ["MatMulNBits", "Reshape"]  # one code tensor for the lookup and the head
    from quantseal.export.inspect_onnx import inspect_onnx

    seen = inspect_onnx(report["path"])["matrices"]  # the file read back: int4f (its offsets), manifest bytes
    assert {r["format"] for r in seen} == {"int4f_b32"} and len(seen) == 2 * 7 + 1


def test_logits_equal_torch_of_the_dequantised_weights(int4f_export):
    _, _, model, lm = int4f_export
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012], [101, 2460, 1012, 2003, 102, 0, 0]])
    mask = np.array([[1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    ref = float_reference_logits(model, ids, mask)
    got = lm.logits(ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() <= 1e-5 * np.abs(ref[real]).max()
    step = lm.logits(ids[:1, :6], mask[:1, :6])  # one token less: the offsets really enter the logits
    assert np.abs(step[0, -1] - got[0, 5]).max() <= 1e-5 * np.abs(ref[real]).max()


def test_onnxruntime_genai_runs_the_int4f_folder(int4f_export):
    _, report, _, lm = int4f_export
    prompt = [101, 2023, 2003, 1037, 3231]
    out = og_greedy(Path(report["path"]).parent, prompt, 12)
    assert len(set(out)) >= 3
    lm.eos_ids = set()
    assert lm.generate_ids(prompt, len(out)) == out


def test_gptq_plan_in_int4f_exports_and_matches_torch(tiny_llama_sharp_dir, tmp_path):
    """``compress --method gptq --budget-mb --formats int4f_b32``: GPTQ rounds every Linear to its
    block's float-offset grid (the table in the plan's format, calibrated as the LM head); the export's logits
    equal the torch model of the stored weights."""
    ck, out = tmp_path / "ck", tmp_path / "onnx" / "model.onnx"
    with one_torch_thread():
        compress_then_export(tiny_llama_sharp_dir, ck, out, ["--method", "gptq", "--budget-mb", "1.7",
                                                             "--formats", "int4f_b32", "--calib-samples", "4"])
        manifest, tensors = read_checkpoint(ck)
        assert {e.format for n, e in manifest.matrices.items() if e.kind == "linear"} == {"int4f_b32"}
        assert "model.embed_tokens" in manifest.matrices  # the table joined the plan (its format the ILP's)
        model, _, _ = load_compressed(ck)
        ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012]])
        ref = float_reference_logits(model, ids, np.ones_like(ids))
    got = CausalLM(out, provider="cpu").logits(ids, np.ones_like(ids))
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
