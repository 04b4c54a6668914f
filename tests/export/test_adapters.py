"""Exact folding of PEFT LoRA adapters into the low-rank branch (DESIGN §5).

PEFT's merge test, adapted: the adapter is first shown to change the model at all; the folded
checkpoint (torch) and the folded ONNX file (onnxruntime) then agree with the compressed model
running the adapter through PEFT itself; and they differ from the model without it."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from quantseal import checkpoint as ckpt
from quantseal.cli import main
from quantseal.compress.qlinear import CompressedLinear, set_submodule
from quantseal.errors import BadInput, Unsupported
from quantseal.export.adapters import fold_adapters, read_adapter, truncate_factored
from quantseal.models import encode
from quantseal.text import TextTokenizer, pydoc_sentences

from peft_base import plain_linears  # tests/export/peft_base.py

pytestmark = pytest.mark.slow
QUERY = "encoder.layer.0.attention.self.query"
TEXTS = pydoc_sentences("evaluation")[:4]


# ----------------------------------------------------------------------------- helpers
def make_peft_adapter(base_dir: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA adapter made with peft on the float model; lora_B seeded non-zero (PEFT
    initialises it to zero, which would make the adapter a no-op)."""
    from peft import LoraConfig, get_peft_model

    from quantseal.models import load_model

    model, _ = load_model(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    return out


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A hand-made adapter folder (config defaults: LoRA, r=2, alpha=4)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], "use_rslora": False}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def lora_pair(module: str, n: int, k: int, r: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{module}.lora_A.weight": torch.randn(r, k, generator=g) * 0.1,
            f"base_model.model.{module}.lora_B.weight": torch.randn(n, r, generator=g) * 0.1}


def embed(model: nn.Module, tok: TextTokenizer, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return encode(model, {k: torch.from_numpy(v) for k, v in tok(texts).items()}).numpy()


def peft_reference(compressed: nn.Module, adapters: list[Path]) -> nn.Module:
    """A copy of the torch compressed model with the adapters applied by PEFT (each merged before
    the next is loaded: sequential application)."""
    from peft import PeftModel

    model = plain_linears(copy.deepcopy(compressed))
    for i, a in enumerate(adapters):
        model = PeftModel.from_pretrained(model, str(a)).eval()
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    return model


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adapter_a(tmp_path_factory, minilm_path) -> Path:
    return make_peft_adapter(minilm_path, tmp_path_factory.mktemp("lora") / "a", seed=1,
                             r=4, lora_alpha=8, target_modules=["query", "value"])


@pytest.fixture(scope="module")
def adapter_b(tmp_path_factory, minilm_path) -> Path:
    """rsLoRA on query and key: s = α/√r, and query gets a second adapter on top of ``adapter_a``."""
    return make_peft_adapter(minilm_path, tmp_path_factory.mktemp("lora") / "b", seed=2,
                             r=8, lora_alpha=4, target_modules=["query", "key"], use_rslora=True)


@pytest.fixture(scope="module")
def tok(minilm_rtn_checkpoint) -> TextTokenizer:
    return TextTokenizer(minilm_rtn_checkpoint)


@pytest.fixture(scope="module")
def compressed(minilm_rtn_checkpoint) -> nn.Module:
    """The torch compressed model (``load_compressed``); tests work on copies."""
    return ckpt.load_compressed(minilm_rtn_checkpoint)[0]


# ----------------------------------------------------------------------------- tests
def test_peft_adapter_is_not_a_noop(minilm_path, adapter_a, tok):
    from peft import PeftModel

    from quantseal.models import load_model

    base, _ = load_model(minilm_path)
    plain = embed(base, tok, TEXTS)
    adapted = embed(PeftModel.from_pretrained(base, str(adapter_a)).eval(), tok, TEXTS)
    assert cosines(plain, adapted).max() < 0.999  # every sentence moves visibly
    ad = read_adapter(adapter_a)
    assert ad.r == 4 and ad.alpha == 8 and len(ad.deltas) == 12
    assert all(d.scale == 2.0 for d in ad.deltas.values())


def test_fold_one_adapter_matches_peft_in_torch(minilm_rtn_checkpoint, compressed, adapter_a, tok):
    manifest, tensors = ckpt.read_checkpoint(minilm_rtn_checkpoint)
    man, out, report = fold_adapters(manifest, tensors, [read_adapter(adapter_a)])
    assert report["matrices"] == sorted(f"encoder.layer.{i}.attention.self.{m}" for i in range(6)
                                        for m in ("query", "value"))
    assert 0 < report["branch_rel_error"] < 2e-3  # float16 rounding of the new factors, nothing more
    for name, e in man.matrices.items():
        old = manifest.matrices[name]
        if name in report["matrices"]:
            assert e.rank == old.rank + 4
            assert e.bytes == old.bytes + 2 * 4 * (e.shape[0] + e.shape[1])  # float16 L1 and L2 columns/rows
            assert out[f"{name}.L1"].dtype == torch.float16
        else:
            assert (e.rank, e.bytes) == (old.rank, old.bytes)
            assert all(out[k] is tensors[k] for k in tensors if k.startswith(name + "."))
        assert e.bytes == ckpt.entry_bytes(name, out)
    assert manifest.matrices[QUERY].rank == 0  # the input is not modified

    folded = copy.deepcopy(compressed)  # what load_compressed builds from the folded tensors
    for name in report["matrices"]:
        mod = folded.get_submodule(name)
        set_submodule(folded, name, CompressedLinear(mod.w_hat, out[f"{name}.L1"].float(), out[f"{name}.L2"].float(),
                                                     mod.bias))
    ref = embed(peft_reference(compressed, [adapter_a]), tok, TEXTS)
    got = embed(folded, tok, TEXTS)
    base = embed(compressed, tok, TEXTS)
    assert cosines(ref, got).min() >= 0.9999
    assert cosines(ref, base).max() < 0.999


def test_two_adapters_in_onnxruntime_match_peft(minilm_rtn_checkpoint, minilm_rtn_onnx, compressed, adapter_a,
                                                adapter_b, tok, tmp_path):
    """``quantseal export --adapter A --adapter B --adapter-rank 12``: query carries 4 + 8 = 12
    ranks, so the truncation is lossless and reported as such; ORT equals torch + PEFT."""
    out = tmp_path / "adapted" / "model.onnx"
    rc, stdout = run_cli(["export", str(minilm_rtn_checkpoint), "-o", str(out), "--adapter", str(adapter_a),
                          "--adapter", str(adapter_b), "--adapter-rank", "12", "--json"])
    assert rc == 0
    res = json.loads(stdout.strip().splitlines()[-1])
    ad = res["adapters"]
    assert [a["r"] for a in ad["adapters"]] == [4, 8] and [a["matrices"] for a in ad["adapters"]] == [12, 12]
    assert ad["adapter_rank"]["rank"] == 12 and ad["adapter_rank"]["error"] == 0.0
    assert ad["ranks"][QUERY] == 12 and ad["ranks"][QUERY.replace("query", "key")] == 8
    assert ad["ranks"][QUERY.replace("query", "value")] == 4
    assert res["ops"]["MatMulNBits"] + res["ops"].get("MatMulBnb4", 0) == 36

    model = onnx.load(str(out))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert inits[f"{QUERY}.L1"] == (384, 12) and inits[f"{QUERY}.L2"] == (12, 384)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["quantseal.matrices"])
    assert meta[QUERY]["rank"] == 12 and meta["encoder.layer.0.output.dense"]["rank"] == 0

    feeds = tok(TEXTS)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["sentence_embedding"], feeds)[0]
    base = ort.InferenceSession(str(minilm_rtn_onnx), providers=["CPUExecutionProvider"]).run(
        ["sentence_embedding"], feeds)[0]
    ref = embed(peft_reference(compressed, [adapter_a, adapter_b]), tok, TEXTS)
    only_a = embed(peft_reference(compressed, [adapter_a]), tok, TEXTS)
    assert cosines(ref, got).min() >= 0.9999
    assert cosines(ref, base).max() < 0.999
    assert cosines(ref, only_a).max() < 0.9999  # the second adapter matters too


def test_fold_is_a_concatenation(tmp_path):
    """On a matrix that already has a branch: the old factors are kept bit for bit, the product
    grows by exactly s·B·A (float64 reference), up to float16 rounding, or float32 when asked."""
    n, k, r0 = 24, 40, 3
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(n, r0, generator=g).half(), torch.randn(r0, k, generator=g).half()
    name = "encoder.layer.0.attention.self.query"
    tensors = {f"{name}.weight": torch.randn(n, k, generator=g).half(), f"{name}.L1": l1, f"{name}.L2": l2,
               "other.weight": torch.randn(n, k, generator=g)}
    entry = ckpt.MatrixEntry("fp16", r0, [n, k], 0.0, ckpt.entry_bytes(name, tensors))
    manifest = ckpt.Manifest({}, "test", {"tensor_bytes": 1000}, {name: entry})
    pair = lora_pair(name, n, k, r=2, seed=1)
    folder = write_adapter(tmp_path / "ad", pair, r=2, lora_alpha=4, alpha_pattern={"query": 6})
    ad = read_adapter(folder)
    assert ad.deltas[name].scale == 3.0  # alpha_pattern overrides lora_alpha, s = 6 / 2

    a = pair[f"base_model.model.{name}.lora_A.weight"].double().numpy()
    b = pair[f"base_model.model.{name}.lora_B.weight"].double().numpy()
    exact = l1.double().numpy() @ l2.double().numpy() + 3.0 * b @ a
    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-6)):
        man, out, rep = fold_adapters(manifest, tensors, [ad], dtype=dtype)
        new1, new2 = out[f"{name}.L1"], out[f"{name}.L2"]
        assert new1.dtype == dtype and new1.shape == (n, r0 + 2) and new2.shape == (r0 + 2, k)
        assert torch.equal(new1[:, :r0].half(), l1) and torch.equal(new2[:r0].half(), l2)
        prod = new1.double().numpy() @ new2.double().numpy()
        rel = np.linalg.norm(prod - exact) / np.linalg.norm(3.0 * b @ a)
        assert rel < tol, (dtype, rel)
        assert abs(rel - rep["adapters"][0]["fold_rel_error"]) < 1e-9
        assert man.matrices[name].rank == r0 + 2 and man.matrices[name].bytes == ckpt.entry_bytes(name, out)
        grown = (new1.numel() + new2.numel() - l1.numel() - l2.numel()) * new1.element_size()
        grown += (l1.numel() + l2.numel()) * (new1.element_size() - 2)
        assert man.budget["tensor_bytes"] == 1000 + grown
        assert man.extra["adapters"][0]["r"] == 2

    # a plain (unplanned) stored Linear becomes an fp32 matrix carrying the adapter as its branch
    pair2 = lora_pair("other", n, k, r=2, seed=2)
    man, out, _ = fold_adapters(manifest, tensors, [read_adapter(write_adapter(tmp_path / "ad2", pair2))])
    assert man.matrices["other"].format == "fp32" and man.matrices["other"].rank == 2
    assert torch.equal(out["other.weight"], tensors["other.weight"])


def test_fold_into_a_smoothed_matrix_acts_on_the_unsmoothed_input(tmp_path):
    """CFP's input smoothing (compress/smoothing.py): the layer computes on x / s, so a LoRA
    ΔW = B·A folded into it is stored as B·A·diag(s) and still acts on the unsmoothed x."""
    n, k = 24, 40
    g = torch.Generator().manual_seed(0)
    name = "encoder.layer.0.intermediate.dense"
    s = 1 + 3 * torch.rand(k, generator=g)
    tensors = {f"{name}.weight": torch.randn(n, k, generator=g).half(), f"{name}.input_smooth": s}
    entry = ckpt.MatrixEntry("fp16", 0, [n, k], 0.0, ckpt.entry_bytes(name, tensors))
    manifest = ckpt.Manifest({}, "test", {"tensor_bytes": 1000}, {name: entry})
    pair = lora_pair(name, n, k, r=2, seed=1)
    ad = read_adapter(write_adapter(tmp_path / "ad", pair, r=2, lora_alpha=2))
    _, out, _ = fold_adapters(manifest, tensors, [ad], dtype=torch.float32)
    a = pair[f"base_model.model.{name}.lora_A.weight"].double()
    b = pair[f"base_model.model.{name}.lora_B.weight"].double()
    x = torch.randn(6, k, generator=g, dtype=torch.float64)
    w = tensors[f"{name}.weight"].double()
    cl = CompressedLinear(w, out[f"{name}.L1"].double(), out[f"{name}.L2"].double(), None, input_smooth=s)
    cl = cl.double()
    want = (x / s.double()) @ w.T + x @ (b @ a).T
    np.testing.assert_allclose(cl(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_adapter_rank_error_is_exact_and_monotone(minilm_rtn_checkpoint, adapter_a, adapter_b):
    manifest, tensors = ckpt.read_checkpoint(minilm_rtn_checkpoint)
    ads = [read_adapter(adapter_a), read_adapter(adapter_b)]
    _, full, rep_full = fold_adapters(manifest, tensors, ads)
    # reference for two matrices (ranks 12 and 8): the discarded singular values of the dense
    # float64 product of the stored factors
    checked = [QUERY, QUERY.replace("0.attention.self.query", "3.attention.self.key")]
    dense = {n: full[f"{n}.L1"].double().numpy() @ full[f"{n}.L2"].double().numpy() for n in checked}
    sv = {n: np.linalg.svd(d, compute_uv=False) for n, d in dense.items()}
    errors = []
    for rank in (1, 2, 4, 8, 12, 16):
        _, out, rep = fold_adapters(manifest, tensors, ads, rank=rank)
        tr = rep["adapter_rank"]
        per = tr["matrix_errors"]
        assert sorted(per) == rep_full["matrices"]
        assert tr["error"] == pytest.approx(np.sqrt(sum(e ** 2 for e in per.values())), rel=1e-9, abs=1e-12)
        for n in checked:
            assert per[n] == pytest.approx(np.sqrt(np.sum(sv[n][rank:] ** 2)), rel=1e-6, abs=1e-9)
        for n in rep["matrices"]:
            assert rep["ranks"][n] == min(rank, rep_full["ranks"][n]) == out[f"{n}.L1"].shape[1]
            assert per[n] == 0.0 if rank >= rep_full["ranks"][n] else per[n] > 0
        q = out[f"{QUERY}.L1"].double().numpy() @ out[f"{QUERY}.L2"].double().numpy()
        best = np.sqrt(np.sum(sv[QUERY][rank:] ** 2))
        assert np.linalg.norm(dense[QUERY] - q) <= best + 2e-3 * np.linalg.norm(dense[QUERY])
        errors.append(tr["error"])
    assert all(a > b for a, b in zip(errors[:4], errors[1:5])) and errors[4] == errors[5] == 0.0

    # the factored truncation equals the dense SVD's best approximation on a random pair
    rng = np.random.default_rng(0)
    p1, p2 = rng.standard_normal((30, 7)), rng.standard_normal((7, 20))
    t1, t2, err, nrm = truncate_factored(p1, p2, 3)
    u, s, vt = np.linalg.svd(p1 @ p2, full_matrices=False)
    np.testing.assert_allclose(t1 @ t2, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-10)
    assert err == pytest.approx(np.sqrt(np.sum(s[3:] ** 2))) and nrm == pytest.approx(np.linalg.norm(p1 @ p2))


def _bad_adapters(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (extra argv, expected message fragment)."""
    q = "encoder.layer.0.attention.self"
    cases = {
        "unknown target": (write_adapter(tmp / "t", lora_pair(f"{q}.bogus", 384, 384)), "not a matrix of the checkpoint"),
        "shape mismatch": (write_adapter(tmp / "s", lora_pair(f"{q}.query", 64, 64)), "is [384, 384]"),
        "rank mismatch": (write_adapter(tmp / "r", lora_pair(f"{q}.query", 384, 384, r=3)), "config says r = 2"),
        "ia3": (write_adapter(tmp / "i", lora_pair(f"{q}.query", 384, 384), peft_type="IA3"), "unknown field 'lora_alpha' for IA3"),
        "dora": (write_adapter(tmp / "d", lora_pair(f"{q}.query", 384, 384), use_dora=True),
                 "lacks lora_magnitude_vector"),
        "unknown kind": (write_adapter(tmp / "k", lora_pair(f"{q}.query", 384, 384), peft_type="OFT"),
                         "peft_type 'OFT'"),
        "extra tensor": (write_adapter(tmp / "x", {**lora_pair(f"{q}.query", 384, 384),
                                                   "base_model.model.pooler.dense.weight": torch.zeros(4, 4)}),
                         "is not a LORA parameter"),
        "missing folder": (tmp / "nowhere", "no such adapter folder"),
    }
    (tmp / "w").mkdir()
    (tmp / "w" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    cases["missing weights"] = (tmp / "w", "adapter_model.safetensors is missing")
    (tmp / "j").mkdir()
    (tmp / "j" / "adapter_config.json").write_text("{not json")
    cases["bad config"] = (tmp / "j", "not valid JSON")
    return {k: (["--adapter", str(p)], msg) for k, (p, msg) in cases.items()}


def test_bad_adapters_exit_2_without_output(minilm_rtn_checkpoint, adapter_a, tmp_path, capsys):
    cases = _bad_adapters(tmp_path / "bad")
    cases["rank 0"] = (["--adapter", str(adapter_a), "--adapter-rank", "0"], "--adapter-rank must be in 1..")
    cases["rank without adapter"] = (["--adapter-rank", "4"], "needs at least one --adapter")
    cases["with half a mark"] = (["--adapter", str(adapter_a), "--board", str(tmp_path)], "needs all of --board")
    outdir = tmp_path / "out"
    for name, (extra, msg) in cases.items():
        rc = main(["export", str(minilm_rtn_checkpoint), "-o", str(outdir / "m.onnx"), *extra])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert msg in err, (name, err)
        assert not outdir.exists() or list(outdir.iterdir()) == [], name  # no file, no leftovers
    with pytest.raises(Unsupported, match="adapter_model.bin"):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"x")
        read_adapter(tmp_path / "bin")
    with pytest.raises(BadInput, match="two adapter modules map to"):
        manifest, tensors = ckpt.read_checkpoint(minilm_rtn_checkpoint)
        pair = {**lora_pair("encoder.layer.0.attention.self.query", 384, 384),
                **{k.replace("base_model.model.", "base_model.model.bert."): v
                   for k, v in lora_pair("encoder.layer.0.attention.self.query", 384, 384).items()}}
        fold_adapters(manifest, tensors, [read_adapter(write_adapter(tmp_path / "dup", pair))])
