"""``--method lq+cbq``: the LQ plan's formats, ranks and bytes are kept exactly, its integer
matrices are refined by CBQ with the low-rank branch in the loop, and the refined model
reconstructs the float model better than the plan it started from."""

import json
import shutil

import pytest
import torch
from test_cbq import block_error  # tests/compress is on sys.path

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.cli import main
from quantseal.compress.calibration import calibration_batches, capture_block_inputs
from quantseal.models import ENCODER, default_model_path, load_model
from quantseal.text import calibration_texts


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    src = default_model_path()
    d = tmp_path_factory.mktemp("tiny_bert_lqcbq")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.1)
    model = BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():  # a strong rank-2 component, as trained weights have: the plan picks branches
        for lin in (m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)):
            n, k = lin.weight.shape
            lin.weight += 0.6 * torch.randn(n, 2) @ torch.randn(2, k) / k ** 0.5
    model.save_pretrained(d)
    shutil.copyfile(src / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.mark.slow
def test_lq_cbq_keeps_the_plan_and_lowers_the_error(tiny_model_dir, tmp_path, capsys):
    common = ["--budget", "4.0", "--formats", "int2,int4", "--ranks", "0,2", "--workers", "1",
              "--calib-samples", "16", "--json"]
    assert main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "lq"), *common]) == 0
    assert main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "lqcbq"), "--method", "lq+cbq",
                 "--steps", "40", "--rank", "4", *common]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m_lq, t_lq = read_checkpoint(tmp_path / "lq")
    m_cb, t_cb = read_checkpoint(tmp_path / "lqcbq")
    assert m_cb.method == "lq+cbq" and rep["refined"] == 12 and rep["kept"] == 0
    assert m_cb.budget["bits_per_param"] == m_lq.budget["bits_per_param"] <= 4.0
    assert any(e.rank for e in m_lq.matrices.values())  # the branch is really in the loop
    for name, e in m_lq.matrices.items():
        f = m_cb.matrices[name]
        assert (f.format, f.rank, f.bytes) == (e.format, e.rank, e.bytes)
        if e.rank:  # the low-rank factors are the plan's, untouched
            assert torch.equal(t_cb[f"{name}.L1"], t_lq[f"{name}.L1"])
    assert any(not torch.equal(t_cb[f"{n}.{part}"], t_lq[f"{n}.{part}"])  # codes and/or step sizes learned
               for n in m_lq.matrices for part in ("qweight", "scales"))

    ref, _ = load_model(tiny_model_dir)
    x = capture_block_inputs(ref, ENCODER, calibration_batches(tiny_model_dir, calibration_texts(None, 32), 16),
                             torch.float32)
    err_lq = block_error(load_compressed(tmp_path / "lq")[0], ref, x)
    err_cb = block_error(load_compressed(tmp_path / "lqcbq")[0], ref, x)
    assert err_cb < 0.9 * err_lq, (err_cb, err_lq)


def test_lq_cbq_refuses_quantised_activations(tiny_model_dir, tmp_path, capsys):
    rc = main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--method", "lq+cbq", "--budget", "4",
               "--abits", "8"])
    assert rc == 2 and "weights only" in capsys.readouterr().err
