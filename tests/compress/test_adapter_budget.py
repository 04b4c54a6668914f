"""Adapter rank under the budget (compress --adapter DIR --adapter-rank auto): each truncation's
error is the discarded singular values' energy (Eckart–Young; weighted: of D_r ΔW D_c), the ILP's
joint (format, rank) choice equals brute force on a tiny problem, and a compressed + exported
tiny BERT fits its byte budget while onnxruntime matches a float64 torch reference built from
peft's own tensors truncated by a dense SVD."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file

from quantseal import checkpoint as ckpt
from quantseal.compress.adapter_budget import halving_ranks, rank_options
from quantseal.compress.budget import MatrixOptions, solve_allocation
from quantseal.errors import BudgetInfeasible

from cli_run import last_json, run  # tests/cli_run.py
from peft_adapters import peft_lora  # tests/peft_adapters.py


def _factors(seed: int, n: int, k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, r)) * np.linspace(2, 0.2, r), rng.standard_normal((r, k))


def test_truncation_error_is_the_discarded_energy():
    b, a = _factors(0, 30, 20, 8)
    delta = b @ a
    sv = np.linalg.svd(delta, compute_uv=False)
    opt = rank_options("m", b, a, None, halving_ranks(8))
    assert opt.ranks == [8, 4, 2, 1, 0] and opt.bytes == [2 * t * 50 for t in opt.ranks]
    total = float(np.sum(sv ** 2))
    for t, err, f in zip(opt.ranks, opt.errors, opt.factors):
        # Eckart–Young: Σ_{j>t} σ_j², plus the float16 storage of the factors (≤ 1e-6 of ‖ΔW‖²)
        assert err == pytest.approx(np.sum(sv[t:] ** 2), abs=1e-6 * total)
        if t:
            assert f[0].shape == (30, t) and f[1].shape == (t, 20)
    assert opt.errors[-1] == pytest.approx(total, rel=1e-12)  # rank 0: the whole delta, exactly
    assert all(x > y for x, y in zip(opt.errors[::-1], opt.errors[-2::-1]))

    # data-aware: F = r cᵀ (rank 1), so Σ F ⊙ E² = ‖D_r E D_c‖² / (mean r · mean c) and the
    # weighted truncation is the SVD of D_r ΔW D_c (float64 reference)
    rng = np.random.default_rng(1)
    r, c = rng.uniform(0.5, 2, 30), rng.uniform(0.5, 2, 20)
    fisher = torch.from_numpy(np.outer(r, c))
    w = np.sqrt(r * c.mean())[:, None] * delta * np.sqrt(c * r.mean())[None, :]
    svw = np.linalg.svd(w, compute_uv=False)
    weighted = rank_options("m", b, a, fisher, halving_ranks(8))
    for t, err in zip(weighted.ranks, weighted.errors):
        want = np.sum(svw[t:] ** 2) / (r.mean() * c.mean())
        assert err == pytest.approx(want, abs=1e-6 * np.sum(svw ** 2))
    for t, f_w, f_u in zip(weighted.ranks, weighted.factors, opt.factors):  # beats the plain SVD in F's norm
        if 0 < t < 8:
            e_w = np.sum(np.outer(r, c) * (delta - f_w[0] @ f_w[1]) ** 2)
            e_u = np.sum(np.outer(r, c) * (delta - f_u[0] @ f_u[1]) ** 2)
            assert e_w < e_u


def test_joint_choice_equals_brute_force():
    """3 matrices × (3 base candidates, adapter ranks 4/2/1/0): the ILP's optimum equals the best
    of all 1728 combinations under every budget, and it trades adapter rank against base format."""
    rng = np.random.default_rng(0)
    base, adapters = [], []
    for i in range(3):
        bytes_ = sorted(int(x) for x in rng.integers(200, 1200, 3))
        errors = sorted((float(x) for x in rng.uniform(1, 30, 3)), reverse=True)
        base.append(MatrixOptions(f"m{i}", ["a", "b", "c"], bytes_, errors))
        b, a = _factors(10 + i, 12, 10, 4)
        adapters.append(rank_options(f"m{i}", b * (i + 1), a, None, halving_ranks(4)).matrix_options())
    options = base + adapters
    floor = sum(min(o.bytes) for o in options)
    top = sum(max(o.bytes) for o in options)
    traded = set()
    for budget in np.linspace(floor, top, 25).astype(int):
        best = min((sum(o.errors[c] for o, c in zip(options, combo)), combo)
                   for combo in itertools.product(*(range(len(o.bytes)) for o in options))
                   if sum(o.bytes[c] for o, c in zip(options, combo)) <= budget)
        choice = solve_allocation(options, int(budget))
        assert sum(o.bytes[c] for o, c in zip(options, choice)) <= budget
        assert sum(o.errors[c] for o, c in zip(options, choice)) == pytest.approx(best[0], rel=1e-9)
        traded.add(tuple(adapters[i].labels[choice[3 + i]] for i in range(3)))
    assert len(traded) > 3  # the adapters' ranks move with the budget
    with pytest.raises(BudgetInfeasible):
        solve_allocation(options, floor - 1)


# ----------------------------------------------------------------------------- end to end
BUDGET_MB = 1.40  # the tiny BERT's smallest plan is 1.383 MB: adapter ranks must be traded


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("adapter_budget")
    a = peft_lora(tiny_bert_dir, root / "a", 1, r=4, lora_alpha=8, target_modules=["query", "value"])
    b = peft_lora(tiny_bert_dir, root / "b", 2, r=8, lora_alpha=4, target_modules=["query", "key", "dense"],
                  use_rslora=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, out, err = run(["compress", tiny_bert_dir, "-o", root / "ck", "--budget-mb", BUDGET_MB, "--ranks", "0,4",
                            "--workers", "1", "--adapter", a, "--adapter", b, "--json"])
        assert rc == 0, err
        rc, out2, err = run(["export", root / "ck", "-o", root / "onnx" / "model.onnx", "--json"])
        assert rc == 0, err
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "a": a, "b": b, "compress": last_json(out), "export": last_json(out2)}


def _peft_delta(folder: Path, module: str) -> np.ndarray | None:
    """s · B · A (float64) of one module, straight from peft's files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    key = f"base_model.model.{module}.lora_A.weight"
    if key not in t:
        return None
    a, b = t[key].astype(np.float64), t[key.replace("lora_A", "lora_B")].astype(np.float64)
    r = a.shape[0]
    s = cfg["lora_alpha"] / (np.sqrt(r) if cfg.get("use_rslora") else r)
    return s * b @ a


def test_export_fits_the_budget_and_matches_the_truncated_adapter(budgeted, tiny_bert_dir):
    from quantseal.models import encode
    from quantseal.text import TextTokenizer

    rep, exp, root = budgeted["compress"], budgeted["export"], budgeted["root"]
    ar = rep["adapter_rank"]
    assert exp["bytes"] <= BUDGET_MB * 1e6  # the whole exported file
    ranks, full = ar["ranks"], ar["full_ranks"]
    assert full["encoder.layer.0.attention.self.query"] == 12 and full["encoder.layer.0.attention.self.value"] == 4
    assert any(0 < ranks[n] < full[n] for n in ranks) and any(ranks[n] < full[n] for n in ranks)
    manifest, tensors = ckpt.read_checkpoint(root / "ck")
    assert manifest.extra["adapter_rank"]["ranks"] == ranks
    assert [x["sha256"] for x in manifest.extra["adapters"]] and len(manifest.extra["adapters"]) == 2
    assert rep["bits_per_param"] * rep["compressible_bytes"] > 0

    # reference: the stored base (codes + the base's own branch) + ΔW truncated by a dense SVD
    model = ckpt.load_compressed(root / "ck")[0]
    from quantseal.compress.qlinear import CompressedLinear, set_submodule

    for name, e in manifest.matrices.items():
        if e.kind != "linear":
            continue
        t = ranks.get(name, 0)
        w_hat, _, _ = ckpt.dequantized_matrix(name, e, tensors)
        w = w_hat.double().numpy()
        r0 = e.rank - t
        if r0:
            w = w + tensors[f"{name}.L1"][:, :r0].double().numpy() @ tensors[f"{name}.L2"][:r0].double().numpy()
        deltas = [d for d in (_peft_delta(budgeted[x], name) for x in ("a", "b")) if d is not None]
        if deltas and t:
            u, s, vt = np.linalg.svd(sum(deltas))
            w = w + (u[:, :t] * s[:t]) @ vt[:t]
        mod = model.get_submodule(name)
        assert isinstance(mod, CompressedLinear)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.double())
        set_submodule(model, name, lin.float())
    tok = TextTokenizer(root / "ck")
    texts = ["the quick brown fox jumps over the lazy dog", "a second sentence", "short", "more tokens to read here"]
    feeds = tok(texts)
    with torch.no_grad():
        ref = encode(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).double().numpy()
    got = ort.InferenceSession(exp["path"], providers=["CPUExecutionProvider"]).run(["sentence_embedding"], feeds)[0]
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert (1 - cos).max() <= 1e-6


def test_infeasible_or_unbudgetable_adapters_exit_2(budgeted, tiny_bert_dir, tmp_path):
    dora = peft_lora(tiny_bert_dir, tmp_path / "dora", 3, r=2, lora_alpha=4, target_modules=["query"], use_dora=True)
    cases = {
        "infeasible": (["--budget-mb", "1.0", "--adapter", budgeted["a"]], "smallest feasible plan needs 1.383"),
        "dora": (["--budget-mb", "2", "--adapter", dora], "magnitude is not a low-rank delta"),
        "rank word": (["--budget-mb", "2", "--adapter", budgeted["a"], "--adapter-rank", "most"], "'auto' or an integer"),
        "rank alone": (["--budget-mb", "2", "--adapter-rank", "2"], "--adapter-rank needs at least one --adapter"),
        "gptq": (["--method", "gptq", "--adapter", budgeted["a"]], "planned by --method lq or rtn"),
    }
    for name, (extra, msg) in cases.items():
        out = tmp_path / name / "ck"
        rc, _, err = run(["compress", tiny_bert_dir, "-o", out, "--ranks", "0,4", "--workers", "1", *extra])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists(), name
