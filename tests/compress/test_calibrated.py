"""`quantseal compress --method gptq|cbq` end to end on a tiny BERT with MiniLM's tokenizer."""

import json

import pytest
import torch

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.cli import main
from quantseal.compress.formats import FormatSpec


@pytest.mark.parametrize("method,abits", [("gptq", 16), ("cbq", 16), ("cbq", 8)])
def test_calibrated_compress_writes_a_loadable_checkpoint(tiny_bert_dir, tmp_path, capsys, method, abits):
    out = tmp_path / "ckpt"
    rc = main(["compress", str(tiny_bert_dir), "-o", str(out), "--method", method, "--wbits", "2",
               "--abits", str(abits), "--block", "16", "--steps", "4", "--rank", "2", "--calib-samples", "8",
               "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["method"] == method and rep["matrices"] == 12 and rep["format"] == "int2_b16"
    manifest, tensors = read_checkpoint(out)
    assert manifest.method == method
    assert all(e.format == "int2_b16" for e in manifest.matrices.values())
    assert ("activations" in manifest.extra) == (abits < 16)
    spec = FormatSpec.parse("int2_b16")  # exact stored bytes: codes + float16 scales + packed zero points
    shapes = [(64, 64)] * 4 + [(128, 64), (64, 128)]  # conftest's tiny BERT: hidden 64, FFN 128
    expect = 2 * sum(spec.stored_bytes(n, k) for n, k in shapes) * 8 / (2 * sum(n * k for n, k in shapes))
    assert rep["bits_per_param"] == pytest.approx(expect, abs=1e-6)
    model, _, _ = load_compressed(out)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()


def test_budget_is_rejected_for_calibrated_methods(tiny_bert_dir, tmp_path, capsys):
    rc = main(["compress", str(tiny_bert_dir), "-o", str(tmp_path / "x"), "--method", "gptq", "--budget", "3"])
    assert rc == 2
    rc = main(["compress", str(tiny_bert_dir), "-o", str(tmp_path / "x"), "--method", "rtn"])
    assert rc == 2
    assert "needs one of --budget" in capsys.readouterr().err
