"""Every PEFT kind of the LoRA family folds exactly, or is refused (issue 13, parts 1 and 3).

For each kind an adapter is made by the real ``peft`` library on a tiny seeded BERT, its weights
set to seeded random values (PEFT initialises most kinds to a no-op) and saved with
``save_pretrained``.  Then, PEFT's merge test adapted: the adapter is first shown to change the
output at all; ``quantseal export --adapter DIR --adapter-dtype float32`` run by onnxruntime must
equal PEFT's own forward on the *compressed* torch model (each compressed Linear as an
``nn.Linear`` holding ``dequant(Q) + L1 L2``) to 1 − cos ≤ 1e-6.  The checkpoint mixes INT4, INT8,
NF4 and fp16 matrices, some with a low-rank branch, so every kind lands on quantised rows and on
existing branches."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from quantseal import checkpoint as ckpt
from quantseal.cli import main
from quantseal.compress.formats import FormatSpec
from quantseal.compress.quantizers import dequantize, quantize, round_float
from quantseal.models import encode
from quantseal.text import TextTokenizer, pydoc_sentences

from peft_base import plain_linears  # tests/export/peft_base.py

peft = pytest.importorskip("peft")

TEXTS = pydoc_sentences("evaluation")[:6]
FORMATS = ["int4_b32", "nf4_b64", "int8_b64", "fp16", "int4s_b32", "int2_b16"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT with its Linears stored in mixed formats, every other one with a rank-4 branch
    fitted to the quantisation residual (built directly, < 1 s)."""
    from quantseal.models import compressible_linears, load_model

    model, fam = load_model(tiny_bert_dir)
    tensors, entries = {}, {}
    for i, (name, lin) in enumerate(compressible_linears(model, fam).items()):
        spec = FormatSpec.parse(FORMATS[i % len(FORMATS)])
        w = lin.weight.detach().float()
        if spec.kind == "fp":
            qt, weight, w_hat = None, round_float(w, spec), round_float(w, spec)
        else:
            qt = quantize(w, spec, clip_search=False)
            weight, w_hat = None, dequantize(qt)
        l1 = l2 = None
        if i % 2:
            u, s, vh = torch.linalg.svd(w - w_hat, full_matrices=False)
            l1, l2 = u[:, :4] * s[:4], vh[:4]
        t = ckpt.matrix_tensors(name, spec, qt, weight, l1, l2)
        entries[name] = ckpt.MatrixEntry(spec.name, 4 if i % 2 else 0, list(w.shape), 0.0, ckpt.entry_bytes(name, t))
        tensors.update(t)
    for k, v in model.state_dict().items():
        if k not in {n + ".weight" for n in entries} and "position_ids" not in k:
            tensors[k] = v.detach().clone().contiguous()
    manifest = ckpt.Manifest(source={"family": "encoder", "model_type": "bert", "path": str(tiny_bert_dir),
                                     "sha256": None}, method="test-mixed",
                             budget={"kind": "bits", "asked": None, "tensor_bytes": 0}, matrices=entries)
    return ckpt.write_checkpoint(tmp_path_factory.mktemp("tiny_mixed") / "ck", manifest, tensors, tiny_bert_dir)


@pytest.fixture(scope="module")
def compressed(tiny_ck) -> nn.Module:
    return ckpt.load_compressed(tiny_ck)[0]


@pytest.fixture(scope="module")
def feeds(tiny_ck) -> dict:
    return TextTokenizer(tiny_ck)(TEXTS)


def embed(model: nn.Module, feeds: dict) -> np.ndarray:
    with torch.no_grad():
        return encode(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy().astype(np.float64)


def one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(1 - np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# ----------------------------------------------------------------------------- making adapters with peft
T = ["query", "value", "intermediate.dense", "output.dense"]
KINDS = {
    "lora_bias": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=T, lora_bias=True)),
    "rslora_patterns": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=T, use_rslora=True,
                                           rank_pattern={"value": 2}, alpha_pattern={"query": 3})),
    "lora_bias_all": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=T, bias="all")),
    "lora_only": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=T, bias="lora_only")),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=T, use_dora=True)),
    "adalora": ("AdaLoraConfig", dict(init_r=6, target_r=4, lora_alpha=16, target_modules=T, total_step=10)),
    "vera": ("VeraConfig", dict(r=8, target_modules=T, projection_prng_key=7)),
    "vera_key": ("VeraConfig", dict(r=8, target_modules=T, projection_prng_key=11, save_projection=False)),
    "ia3": ("IA3Config", dict(target_modules=T, feedforward_modules=["intermediate.dense"])),
    "loha": ("LoHaConfig", dict(r=3, alpha=6, target_modules=T, rank_pattern={"value": 2})),
    "loha_r81": ("LoHaConfig", dict(r=9, alpha=6, target_modules=T)),  # r² = 81 > 64: stored at rank ≤ 64
    "lokr": ("LoKrConfig", dict(r=2, alpha=4, target_modules=T)),
    "lokr_both": ("LoKrConfig", dict(r=2, alpha=4, target_modules=T, decompose_both=True)),
    "miss": ("MissConfig", dict(r=8, target_modules=T)),
    "miss_mini": ("MissConfig", dict(r=8, mini_r=16, init_weights="mini", target_modules=T)),
}


def randomise(model: nn.Module, seed: int) -> None:
    """Seeded random values for every trainable tensor: scale-like ones around 1 (IA³, DoRA's
    magnitude, VeRA's λ), the rest N(0, 0.3²) (so the delta is clearly not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))  # U(0.5, 1.5): positive, clearly not 1
            elif "magnitude" in name:
                p.mul_(1 + 0.3 * noise.abs().clamp(max=2) * noise.sign())
                p.abs_()
            elif "lambda" in name:
                p.copy_(1 + 0.5 * noise)
            elif name.endswith("bias") and "lora" not in name:
                p.add_(0.3 * noise)
            else:
                p.copy_(0.3 * noise)


def make_adapter(base_dir: Path, out: Path, kind: str, seed: int = 0) -> Path:
    from quantseal.models import load_model

    cls, kw = KINDS[kind]
    model, _ = load_model(base_dir)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, getattr(peft, cls)(**kw))
    randomise(pm, seed + 1)
    pm.save_pretrained(out)
    return out


def peft_reference(compressed: nn.Module, adapter: Path) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(plain_linears(copy.deepcopy(compressed)), str(adapter)).eval()
    return model


def export(ck: Path, out: Path, *adapters: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    import contextlib
    import io

    argv = ["export", str(ck), "-o", str(out), "--adapter-dtype", "float32", "--accuracy-level", "0", "--json", *extra]
    for a in adapters:
        argv += ["--adapter", str(a)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, (json.loads(buf.getvalue().strip().splitlines()[-1]) if rc == 0 else {})


def run_onnx(path: Path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["sentence_embedding"], feeds)[0]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_folds_exactly_through_onnxruntime(kind, tiny_bert_dir, tiny_ck, compressed, feeds, tmp_path):
    adapter = make_adapter(tiny_bert_dir, tmp_path / "adapter", kind)
    ref_model = peft_reference(compressed, adapter)
    ref = embed(ref_model, feeds)
    base = embed(compressed, feeds)
    assert one_minus_cos(ref, base) > 1e-4, "the adapter must change the output at all"

    rc, res = export(tiny_ck, tmp_path / "onnx" / "model.onnx", adapter)
    assert rc == 0
    got = run_onnx(tmp_path / "onnx" / "model.onnx", feeds)
    assert one_minus_cos(got, ref) <= 1e-6, kind
    assert np.abs(got - ref).max() <= 1e-5, kind  # unit-norm embeddings, float32 arithmetic
    # the torch model of the folded checkpoint agrees too (what load_compressed builds)
    rep = res["adapters"]
    assert rep["dtype"] == "float32" and rep["adapters"][0]["fold_rel_error"] < 1e-6
    assert rep["adapters"][0]["matrices"] == 10  # query, value, intermediate, both output.dense × 2 layers
    if kind == "ia3":
        assert rep["adapters"][0]["edits"] == {"low_rank": 0, "input_scale": 2, "magnitude": 0, "bias_add": 0,
                                               "output_scale": 8, "kronecker": 0, "replaced_biases": 0}
        assert res["ops"].get("Mul", 0) >= 8
    if kind.startswith("lokr"):  # stored as the Kronecker factors themselves: 8·8 + 8·8 numbers on 64×64
        assert rep["kronecker"]["encoder.layer.0.attention.self.query"] == [[8, 8], [8, 8]]
        assert rep["ranks"]["encoder.layer.0.attention.self.query"] == 0
        assert rep["adapters"][0]["edits"]["kronecker"] == 10 and rep["adapters"][0]["edits"]["low_rank"] == 0
        import onnx

        inits = {t.name: list(t.dims) for t in onnx.load(res["path"]).graph.initializer}
        assert inits["encoder.layer.0.attention.self.query.K1"] == [8, 8]
        assert "encoder.layer.0.attention.self.query.L1" not in inits
    if kind == "loha_r81":  # each 64-wide matrix gets 64 new ranks, not 81, beside its old branch
        layer = "encoder.layer.0."
        assert rep["ranks"][layer + "attention.self.query"] == 64  # no branch before
        assert rep["ranks"][layer + "attention.output.dense"] == 4 + 64  # a rank-4 branch before
    if kind == "dora":
        assert rep["adapters"][0]["edits"]["magnitude"] == 10
    if kind == "lora_bias_all":
        assert rep["adapters"][0]["edits"]["replaced_biases"] > 10  # LayerNorm biases too


def test_face_splitting_and_kronecker_are_exact():
    """LoHa's rank-r² and LoKr's rank-r1·r2 factorisations equal the dense products (float64)."""
    from quantseal.export.adapters.loha import face_split

    rng = np.random.default_rng(0)
    p1, q1, p2, q2 = rng.standard_normal((7, 3)), rng.standard_normal((3, 5)), rng.standard_normal((7, 2)), \
        rng.standard_normal((2, 5))
    b, a = face_split(p1, q1, p2, q2)
    assert b.shape == (7, 6) and a.shape == (6, 5)
    np.testing.assert_allclose(b @ a, (p1 @ q1) * (p2 @ q2), rtol=1e-13, atol=1e-13)
    u1, v1, u2, v2 = rng.standard_normal((3, 2)), rng.standard_normal((2, 4)), rng.standard_normal((5, 3)), \
        rng.standard_normal((3, 2))
    np.testing.assert_allclose(np.kron(u1, u2) @ np.kron(v1, v2), np.kron(u1 @ v1, u2 @ v2), rtol=1e-13, atol=1e-13)


def test_vera_projections_equal_peft(tmp_path):
    """The shared VeRA pair regenerated from the key is bit-identical to PEFT's."""
    from peft.tuners.vera.model import _kaiming_init

    from quantseal.export.adapters.vera import projections

    g = torch.Generator(device="cpu").manual_seed(11)
    want_a, want_b = _kaiming_init((8, 128), generator=g), _kaiming_init((128, 8), generator=g)
    a, b = projections(11, 8, 128, 128)
    assert np.array_equal(a, want_a.double().numpy()) and np.array_equal(b, want_b.double().numpy())


# ----------------------------------------------------------------------------- refusals (part 3)
REFUSED = {
    "alora": ("LoraConfig", dict(r=4, target_modules=["query"], alora_invocation_tokens=[101, 102]),
              "alora_invocation_tokens"),
    "pissa": ("LoraConfig", dict(r=4, target_modules=["query"], init_lora_weights="pissa"), "init_lora_weights"),
    "miss_bat": ("MissConfig", dict(r=8, target_modules=["query"], init_weights="bat"), "init_weights"),
}


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("case", sorted(REFUSED) + ["unknown_field", "bdlora", "kasa", "arrow", "qalora",
                                                     "modules_to_save", "xlora"])
def test_refusals_name_the_field_and_exit_2(case, tiny_bert_dir, tiny_ck, tmp_path, capsys):
    if case in REFUSED:
        cls, kw, field = REFUSED[case]
        KINDS[case] = (cls, kw)
        try:
            adapter = make_adapter(tiny_bert_dir, tmp_path / "a", case)
        finally:
            del KINDS[case]
    else:
        adapter = make_adapter(tiny_bert_dir, tmp_path / "a", "lora_bias")
        field, value = {"xlora": ("peft_type", "XLORA"), "unknown_field": ("use_future_trick", True), "bdlora": ("use_bdlora", {"nblocks": 2}),
                        "kasa": ("kasa_config", {"k": 1}), "arrow": ("arrow_config", {"top_k": 2}),
                        "qalora": ("use_qalora", True), "modules_to_save": ("modules_to_save", ["pooler"])}[case]
        _edit_config(adapter, **{field: value})
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["export", str(tiny_ck), "-o", str(out / "m.onnx"), "--adapter", str(adapter)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, case
    assert len(err.splitlines()) == 1 and field in err, (case, err)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("kinds", [["ia3", "dora", "lora_bias"], ["lokr", "ia3", "lokr_both"], ["ia3", "lokr"]])
def test_adapters_in_sequence_match_peft_merging_each(kinds, tiny_bert_dir, tiny_ck, compressed, feeds, tmp_path):
    """Adapters on the same matrices fold each on top of the previous ones, as PEFT computes when it
    merges each before loading the next: a low-rank delta after an output scale is stored as
    ``b / o``; DoRA's norm is over rows already scaled by IA³; a Kronecker branch stays under a later
    output scale but moves into the low-rank branch before a later input divisor; a LoKr on a
    scaled layer (or on one that has a Kronecker branch already) takes the rank form."""
    adapters = [make_adapter(tiny_bert_dir, tmp_path / k, k, seed=i) for i, k in enumerate(kinds)]
    model = plain_linears(copy.deepcopy(compressed))
    for i, a in enumerate(adapters):
        model = peft.PeftModel.from_pretrained(model, str(a)).eval()
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    ref = embed(model, feeds)
    last_only = embed(peft_reference(compressed, adapters[-1]), feeds)
    assert one_minus_cos(ref, last_only) > 1e-4
    rc, res = export(tiny_ck, tmp_path / "onnx" / "model.onnx", *adapters)
    assert rc == 0 and len(res["adapters"]["adapters"]) == len(kinds)
    kron = res["adapters"]["kronecker"]
    if kinds[0] == "lokr":  # stored as K1 ⊗ K2 where IA³ scales outputs; moved where it divides inputs
        assert "encoder.layer.0.attention.self.query" in kron and "encoder.layer.0.intermediate.dense" not in kron
    if kinds[0] == "ia3":
        assert kron == {}
    got = run_onnx(tmp_path / "onnx" / "model.onnx", feeds)
    assert one_minus_cos(got, ref) <= 1e-6 and np.abs(got - ref).max() <= 1e-5


DECODER_KINDS = {
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "lokr": ("LoKrConfig", dict(r=2, alpha=4, target_modules=["q_proj", "gate_proj", "down_proj"])),  # Kronecker nodes
    # LLaMA's Linears have no bias: lora_bias makes one (PEFT warns, and its forward adds it)
    "lora_bias": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kinds", [["lokr", "ia3"], ["dora", "lora_bias"]])
def test_decoder_kinds_match_peft_logits(kinds, tiny_llama_sharp_dir, llama_lq_export, tmp_path):
    """The LLaMA graph (built by the dynamo exporter) takes the Kronecker nodes, the output Mul, the
    input divisor and a new bias too: onnxruntime's logits equal PEFT's on the compressed model
    (two adapters per export, PEFT merging the first before loading the second)."""
    from quantseal.runtime.pipelines import CausalLM

    ck, _ = llama_lq_export
    compressed_lm = ckpt.load_compressed(ck)[0]
    adapters = []
    for i, kind in enumerate(kinds):
        KINDS[f"dec_{kind}"] = DECODER_KINDS[kind]
        try:
            adapters.append(make_adapter(tiny_llama_sharp_dir, tmp_path / kind, f"dec_{kind}", seed=i))
        finally:
            del KINDS[f"dec_{kind}"]
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231]], dtype=np.int64)
    model = plain_linears(copy.deepcopy(compressed_lm))
    for i, a in enumerate(adapters):
        model = peft.PeftModel.from_pretrained(model, str(a)).eval()
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits[0].double().numpy()
        base = compressed_lm(input_ids=torch.from_numpy(ids)).logits[0].double().numpy()
    assert one_minus_cos(ref, base) > 1e-4
    rc, res = export(ck, tmp_path / "onnx" / "model.onnx", *adapters)
    assert rc == 0
    if kinds[0] == "lokr":  # q_proj and gate_proj keep K1 ⊗ K2; down_proj's moved before IA³'s divisor
        assert sorted(res["adapters"]["kronecker"]) == [f"model.layers.{i}.{m}" for i in range(2)
                                                        for m in ("mlp.gate_proj", "self_attn.q_proj")]
    got = CausalLM(res["path"], provider="cpu").logits(ids)[0]
    assert one_minus_cos(got, ref) <= 1e-6
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_adalora_with_an_allocated_rank_pattern(tiny_bert_dir, tiny_ck, compressed, feeds, tmp_path):
    """After AdaLoRA's budget allocation the saved factors keep only the masked-in ranks and PEFT
    reloads them with ``ranknum`` = the kept count: the fold divides by that count, not ``init_r``."""
    from quantseal.models import load_model

    model, _ = load_model(tiny_bert_dir)
    pm = peft.get_peft_model(model, peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=16, target_modules=T,
                                                       total_step=10))
    randomise(pm, 5)
    names = sorted({n.split(".lora_E")[0] for n, _ in pm.named_parameters() if "lora_E" in n})
    keep = [True, False, True, True, False, True]
    pm.peft_config["default"].rank_pattern = {n.replace("base_model.model.", "") + ".lora_E": keep for n in names}
    pm.save_pretrained(tmp_path / "a")
    ad = __import__("quantseal.export.adapters", fromlist=["read_adapter"]).read_adapter(tmp_path / "a")
    assert {d.rank for d in ad.deltas.values()} == {4}
    ref = embed(peft_reference(compressed, tmp_path / "a"), feeds)
    assert one_minus_cos(ref, embed(compressed, feeds)) > 1e-4
    rc, _ = export(tiny_ck, tmp_path / "onnx" / "model.onnx", tmp_path / "a")
    assert rc == 0
    got = run_onnx(tmp_path / "onnx" / "model.onnx", feeds)
    assert one_minus_cos(got, ref) <= 1e-6 and np.abs(got - ref).max() <= 1e-5


def test_fold_bytes_and_budget_are_counted(tiny_bert_dir, tiny_ck, tmp_path):
    """DoRA adds a float32 ``output_scale`` (N,) per matrix and rank-4 factors; LoKr its Kronecker
    factors.  Each matrix's manifest ``bytes`` still equal its stored codes + factors (the export
    checks them against the graph), and ``tensor_bytes`` grows by exactly what was added."""
    from quantseal.export.adapters import fold_adapters, read_adapter

    manifest, tensors = ckpt.read_checkpoint(tiny_ck)
    ads = [read_adapter(make_adapter(tiny_bert_dir, tmp_path / k, k)) for k in ("dora", "lokr")]
    man, out, rep = fold_adapters(manifest, tensors, ads, dtype=torch.float32)
    q = "encoder.layer.0.attention.self.query"
    assert out[f"{q}.output_scale"].dtype == torch.float32 and out[f"{q}.output_scale"].shape == (64,)
    # DoRA rank 4, then LoKr in rank form (8 · 2 = 16): DoRA's output scale came first
    assert out[f"{q}.L1"].shape == (64, 4 + 16) and q not in rep["kronecker"]
    added = sum(t.numel() * t.element_size() for k, t in out.items() if k not in tensors)
    grown = sum(out[k].numel() * out[k].element_size() - t.numel() * t.element_size()
                for k, t in tensors.items() if k in out)
    assert man.budget["tensor_bytes"] == manifest.budget["tensor_bytes"] + added + grown
    for name, e in man.matrices.items():
        assert e.bytes == ckpt.entry_bytes(name, out)
    lokr_only = fold_adapters(manifest, tensors, ads[1:], dtype=torch.float32)
    assert lokr_only[0].matrices[q].bytes == manifest.matrices[q].bytes + 4 * (8 * 8 + 8 * 8)
