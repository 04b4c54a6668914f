"""The tied token table calibrated as the LM head (quantseal.compress.head_table): on a tiny seeded
LLaMA, GPTQ's table has a lower head output error than round-to-nearest's (float64 reference), and
``compress --method gptq --table`` stores it once, read by both the lookup and the head."""

import torch

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.compress.calibration import calibration_batches
from quantseal.compress.formats import FormatSpec
from quantseal.compress.head_table import calibrate_table, head_error, head_inputs
from quantseal.compress.quantizers import dequantize, quantize_int
from quantseal.models import embedding, load_model
from quantseal.text import calibration_texts
from tests.cli_run import last_json, run


def _head_inputs(model_dir, samples=32):
    model, fam = load_model(model_dir)
    batches = calibration_batches(model_dir, calibration_texts(None, samples), 8)
    with torch.no_grad():
        x = head_inputs(model, batches)
    return model, fam, batches, x


def test_head_inputs_are_the_final_normed_states_of_real_tokens(tiny_llama_dir):
    model, _, batches, x = _head_inputs(tiny_llama_dir, samples=8)
    b = batches[0]
    with torch.no_grad():
        ref = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    mask = b["attention_mask"].bool()
    assert x.shape == (int(sum(bb["attention_mask"].sum() for bb in batches)), 64)
    torch.testing.assert_close(x[: int(mask.sum())], ref[mask], rtol=0, atol=0)


def test_gptq_table_beats_rtn_on_the_heads_output_error(tiny_llama_dir):
    torch.set_num_threads(1)
    model, fam, _, x = _head_inputs(tiny_llama_dir)
    table = embedding(model, fam).weight.detach().float()
    spec = FormatSpec.parse("int4_b32")
    gptq = dequantize(calibrate_table(table, x, spec))
    rtn = dequantize(quantize_int(table, spec))
    # the float64 trace formula equals the brute-force logits error on a slice of the vocabulary
    d = (table - gptq).double()[:500]
    brute = float(((x.double() @ d.T) ** 2).sum())
    assert abs(head_error(table[:500], gptq[:500], x) - brute) <= 1e-9 * brute
    e_gptq, e_rtn = head_error(table, gptq, x), head_error(table, rtn, x)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # the codes are the format's: every row dequantises onto its block's grid
    assert torch.isfinite(gptq).all() and gptq.shape == table.shape
    # dampening moves GPTQ towards round-to-nearest: the table's own (lookup) error shrinks
    loose = dequantize(calibrate_table(table, x, spec, percdamp=100.0))
    row = lambda w: float(((table.double() - w.double()) ** 2).sum())  # noqa: E731
    assert row(loose) < row(gptq)


def test_compress_gptq_table_is_calibrated_and_stored_once(tiny_llama_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "ck"
    rc, stdout, err = run(["compress", tiny_llama_dir, "-o", out, "--method", "gptq", "--wbits", "4", "--block", "32",
                           "--table", "int4_b32", "--calib-samples", "32", "--json"])
    assert rc == 0, err
    assert last_json(stdout)["matrices"] == 15  # 2 layers × 7 Linears + the table
    manifest, tensors = read_checkpoint(out)
    assert manifest.extra["table_method"] == "gptq"
    assert "model.embed_tokens.qweight" in tensors and "lm_head.weight" not in tensors  # stored once
    # the end-to-end head error on calibration data against the float table's logits (float64), for
    # the stored table and for round-to-nearest's in its place (same quantised Linears)
    model, fam, batches, _ = _head_inputs(tiny_llama_dir)
    table = embedding(model, fam).weight.detach().float()
    q, _, _ = load_compressed(out)
    stored = q.get_output_embeddings().weight.clone()
    errs = {}
    for method, w_hat in (("gptq", stored), ("rtn", dequantize(quantize_int(table, FormatSpec.parse("int4_b32"))))):
        q.get_input_embeddings().w_hat.copy_(w_hat)
        x = head_inputs(q, batches)  # the quantised model's own head inputs
        with torch.no_grad():
            logits = torch.cat([q(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[
                b["attention_mask"].bool()] for b in batches]).double()
        torch.testing.assert_close(logits, x.double() @ w_hat.double().T, rtol=1e-5, atol=1e-4)  # the head reads it
        errs[method] = float(((logits - x.double() @ table.double().T) ** 2).sum())
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_table_method_rtn_keeps_round_to_nearest(tiny_llama_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "ck"
    rc, _, err = run(["compress", tiny_llama_dir, "-o", out, "--method", "gptq", "--wbits", "8", "--block", "64",
                      "--table", "int4_b32", "--table-method", "rtn", "--calib-samples", "8", "--json"])
    assert rc == 0, err
    manifest, _ = read_checkpoint(out)
    assert manifest.extra["table_method"] == "rtn"
    model, fam = load_model(tiny_llama_dir)
    rtn = dequantize(quantize_int(embedding(model, fam).weight.detach().float(), FormatSpec.parse("int4_b32")))
    q, _, _ = load_compressed(out)
    assert torch.equal(q.get_output_embeddings().weight, rtn)


def test_row_chunks_give_the_whole_tables_codes():
    """The table solved in row chunks (one factorisation of the head's Hessian) equals one solve of
    the whole table as a Linear, bit for bit, for int and int4f, chunks dividing V or not; the
    chunked head error equals the whole-table formula to float64 rounding."""
    from torch import nn

    from quantseal.compress.gptq import GPTQ

    g = torch.Generator().manual_seed(3)
    table = torch.randn(300, 48, generator=g)
    x = torch.randn(500, 48, generator=g) @ torch.randn(48, 48, generator=g) / 7
    for spec in (FormatSpec("int", 4, 16), FormatSpec.parse("int4f_b16")):
        lin = nn.Linear(48, 300, bias=False)
        lin.weight.data = table.clone()
        whole = GPTQ(lin)
        whole.add_batch(x)
        ref = whole.quantize(spec)
        for rows in (300, 64, 37, 1):
            got = calibrate_table(table, x, spec, chunk_rows=rows)
            assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales), (spec.name, rows)
            for a, b in ((got.zeros, ref.zeros), (got.offsets, ref.offsets)):
                assert (a is None and b is None) or torch.equal(a, b), (spec.name, rows)
        w_hat = dequantize(ref)
        d = table.double() - w_hat.double()
        one = float(((d @ (x.double().T @ x.double())) * d).sum())
        for rows in (300, 37):
            assert abs(head_error(table, w_hat, x, chunk_rows=rows) - one) <= 1e-12 * one
