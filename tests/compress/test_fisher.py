"""The output-sensitivity Fisher against a brute-force per-sentence Jacobian."""

import torch

from quantseal.compress.fisher import floor_fisher, output_fisher, scale_vectors
from quantseal.models import compressible_linears, encode, load_model
from quantseal.text import TextTokenizer, pydoc_sentences


def test_embedding_fisher_matches_exact_gauss_newton_diagonal(tiny_bert_dir):
    model, fam = load_model(tiny_bert_dir)
    tok = TextTokenizer(tiny_bert_dir)
    texts = pydoc_sentences("calibration")[:3]
    batch = {k: torch.from_numpy(v) for k, v in tok(texts).items()}
    name = "encoder.layer.1.output.dense"
    weight = compressible_linears(model, fam)[name].weight

    # brute force: diag(JᵀJ) summed over sentences, J = ∂e(x)/∂W, one output coordinate at a time
    exact = torch.zeros_like(weight, dtype=torch.float64)
    for i in range(len(texts)):
        single = {k: v[i:i + 1] for k, v in batch.items()}
        for j in range(64):
            model.zero_grad()
            weight.requires_grad_(True)
            encode(model, single)[0, j].backward()
            exact += weight.grad.double() ** 2
    exact /= len(texts)

    est = output_fisher(model, fam, [batch] * 200, {name: weight}, seed=0)[name].double()
    # unbiased random-direction estimator: agrees in aggregate and row by row
    assert abs(est.sum() / exact.sum() - 1) < 0.08
    rows_est, rows_exact = est.sum(1), exact.sum(1)
    assert ((rows_est - rows_exact).abs() / rows_exact).max() < 0.35
    # and element-wise: far closer to the exact diagonal than to a shuffled one
    shuffled = exact.flatten()[torch.randperm(exact.numel(), generator=torch.Generator().manual_seed(0))]
    assert (est.flatten() - exact.flatten()).norm() < 0.5 * (est.flatten() - shuffled).norm()
    # the estimator leaves the model's grads and flags as it found them
    assert weight.grad is None


def test_decoder_fisher_runs_on_next_token_loss(tiny_llama_dir):
    model, fam = load_model(tiny_llama_dir)
    tok = TextTokenizer(tiny_llama_dir)
    batch = {k: torch.from_numpy(v) for k, v in tok(pydoc_sentences("calibration")[:4]).items()}
    lin = compressible_linears(model, fam)
    f = output_fisher(model, fam, [batch], {n: m.weight for n, m in lin.items()})
    assert set(f) == set(lin)
    assert all(v.shape == lin[n].weight.shape and (v >= 0).all() and v.sum() > 0 for n, v in f.items())


def test_scale_vectors_and_floor():
    f = torch.zeros(4, 6)
    f[0, 0] = 10.0
    d_r, d_c = scale_vectors(f)
    assert (d_r > 0).all() and (d_c > 0).all()
    assert d_r[0] > d_r[1] and d_c[0] > d_c[1]
    assert (floor_fisher(f) > 0).all()
