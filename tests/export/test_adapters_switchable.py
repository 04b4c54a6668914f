"""Switchable adapters (``export --adapter A --adapter B --switchable``): one file, a branch per
adapter chosen by the ``adapter_id`` input.  Each id must give what the single-adapter *folded*
export gives (itself checked against peft in test_adapters*.py), id 0 the base export; run/serve
select adapters by name; what cannot switch is refused with exit 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from quantseal.text import TextTokenizer

from cli_run import last_json, run  # tests/cli_run.py
from peft_adapters import peft_lora  # tests/peft_adapters.py

TEXTS = ["the quick brown fox jumps over the lazy dog", "a second, longer sentence with some words in it",
         "short", "tokens and more tokens for the encoder to read"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT compressed (LQ, 4.5 bits, ranks 0/4), two peft adapters (LoRA r=4 on
    query/value; rsLoRA r=8 on query/key/every dense), and four exports: switchable, each folded,
    base."""
    root = tmp_path_factory.mktemp("switch")
    ck = root / "ck"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(["compress", tiny_bert_dir, "-o", ck, "--budget", "4.5", "--ranks", "0,4", "--workers", "1"])[0] == 0
        a = peft_lora(tiny_bert_dir, root / "ad_a", 1, r=4, lora_alpha=8, target_modules=["query", "value"])
        b = peft_lora(tiny_bert_dir, root / "ad_b", 2, r=8, lora_alpha=4, target_modules=["query", "key", "dense"],
                      use_rslora=True)
        rc, out, err = run(["export", ck, "-o", root / "sw" / "model.onnx", "--adapter", f"alpha={a}",
                            "--adapter", b, "--switchable", "--json"])
        assert rc == 0, err
        report = last_json(out)
        for name, extra in (("fa", ["--adapter", a]), ("fb", ["--adapter", b]), ("base", [])):
            assert run(["export", ck, "-o", root / name / "model.onnx", *extra])[0] == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "ck": ck, "a": a, "b": b, "report": report, "sw": root / "sw" / "model.onnx",
            "tok": TextTokenizer(ck)}


def _embed(path: Path, feeds: dict, adapter_id=None) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if adapter_id is not None:
        feeds = {**feeds, "adapter_id": np.asarray(adapter_id, dtype=np.int64)}
    return sess.run(["sentence_embedding"], feeds)[0]


def _one_minus_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 1 - np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def test_each_id_equals_its_folded_export(setup):
    """id 0 = base export, id j = the folded export of adapter j (1−cos ≤ 1e-6), as a scalar and
    per row in one mixed batch; and the adapters do change the output."""
    root, feeds = setup["root"], setup["tok"](TEXTS)
    refs = [_embed(root / n / "model.onnx", feeds) for n in ("base", "fa", "fb")]
    for j, ref in enumerate(refs):
        got = _embed(setup["sw"], feeds, j)
        assert _one_minus_cos(got, ref).max() <= 1e-6, j
    for j in (1, 2):
        assert _one_minus_cos(refs[j], refs[0]).min() > 1e-3  # each adapter moves every sentence
    ids = np.array([2, 0, 1, 2])
    mixed = _embed(setup["sw"], feeds, ids)
    want = np.stack([refs[i][row] for row, i in enumerate(ids)])
    assert _one_minus_cos(mixed, want).max() <= 1e-6


def test_graph_holds_one_gathered_branch_per_matrix(setup):
    rep = setup["report"]
    model = onnx.load(str(setup["sw"]))
    assert [i.name for i in model.graph.input][-1] == "adapter_id"
    meta = {p.key: p.value for p in model.metadata_props}
    info = json.loads(meta["quantseal.adapters"])
    assert [(a["id"], a["name"], a["r"]) for a in info] == [(1, "alpha", 4), (2, "ad_b", 8)]
    inits = {t.name: t for t in model.graph.initializer}
    q = "encoder.layer.0.attention.self.query"
    v = "encoder.layer.0.attention.self.value"
    assert tuple(inits[f"{q}.adapters.AT"].dims) == (2, 64, 8)  # J adapters, K, max rank
    assert tuple(inits[f"{v}.adapters.BT"].dims) == (2, 4, 64)  # value: only adapter 1 (rank 4)
    at = onnx.numpy_helper.to_array(inits[f"{v}.adapters.AT"])
    assert at.dtype == np.float16 and not at[1].any() and at[0].all()  # adapter 2 leaves value alone: zeros
    at = onnx.numpy_helper.to_array(inits[f"{q}.adapters.AT"])
    assert not at[0][:, 4:].any() and at[0][:, :4].all() and at[1].all()  # rank 4 padded to 8
    # every adapted matrix: exactly one Gather of each stack (one branch per row, whatever J is)
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0].endswith((".AT", ".BT"))]
    assert len(gathers) == 2 * len(rep["adapters"]["matrices"]) == 2 * 12
    added = sum(int(np.prod(t.dims)) * 2 for n, t in inits.items() if ".adapters." in n)
    assert rep["adapter_bytes"] == added + 8 * 6  # the stacks (float16) + six int64 constant entries
    base_bytes = (setup["root"] / "base" / "model.onnx").stat().st_size
    graph = rep["bytes"] - base_bytes - rep["adapter_bytes"]  # the new nodes' protobuf, names, metadata
    assert 0 < graph < 2500 * len(rep["adapters"]["matrices"])


def test_run_and_serve_select_an_adapter_by_name(setup, capsys):
    from quantseal.runtime.server import RequestError, service_for

    sw, root = setup["sw"], setup["root"]
    rc, out, _ = run(["run", sw, "--text", TEXTS[0], "--text", TEXTS[1], "--adapter", "ad_b", "--json"])
    assert rc == 0
    res = last_json(out)
    assert res["adapter"] == "ad_b"
    ref = _embed(root / "fb" / "model.onnx", setup["tok"](TEXTS[:2]))
    assert _one_minus_cos(np.array(res["embeddings"]), ref).max() <= 1e-6
    rc, out, _ = run(["run", sw, "--text", TEXTS[0], "--json"])  # no --adapter: the base model
    base = _embed(root / "base" / "model.onnx", setup["tok"](TEXTS[:1]))
    assert _one_minus_cos(np.array(last_json(out)["embeddings"]), base).max() <= 1e-6

    for model, name, msg in ((sw, "gamma", "no adapter named 'gamma' (it has alpha, ad_b)"),
                             (root / "base" / "model.onnx", "alpha", "has no switchable adapters")):
        rc, out, err = run(["run", model, "--text", "x", "--adapter", name])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err

    service = service_for(sw, provider="cpu", adapter="alpha")
    assert service.health()["adapters"] == ["alpha", "ad_b"]
    fa = _embed(root / "fa" / "model.onnx", setup["tok"](TEXTS[:2]))
    got = np.array(service.embed({"texts": TEXTS[:2]})["embeddings"])  # serve --adapter alpha
    assert _one_minus_cos(got, fa).max() <= 1e-6
    got = np.array(service.embed({"texts": TEXTS[:2], "adapter": "ad_b"})["embeddings"])  # per request
    assert _one_minus_cos(got, ref).max() <= 1e-6
    ids = setup["tok"](TEXTS[:2])
    got = np.array(service.embed({"input_ids": ids["input_ids"].tolist(), "attention_mask": ids["attention_mask"].tolist(),
                                  "adapter": "ad_b"})["embeddings"])
    assert _one_minus_cos(got, ref).max() <= 1e-6
    with pytest.raises(RequestError, match="no adapter named 'zeta'"):
        service.embed({"texts": ["x"], "adapter": "zeta"})


def test_what_cannot_switch_is_refused(setup, tiny_bert_dir, tmp_path):
    """exit 2, one line on stderr, nothing written."""
    ck, a = setup["ck"], setup["a"]
    dora = peft_lora(tiny_bert_dir, tmp_path / "dora", 3, r=2, lora_alpha=4, target_modules=["query"], use_dora=True)
    cases = {
        "dora": (["--adapter", a, "--adapter", dora, "--switchable"], "magnitude edits is not switchable"),
        "no adapter": (["--switchable"], "--switchable needs at least one --adapter"),
        "with rank": (["--adapter", a, "--switchable", "--adapter-rank", "2"], "does not apply with --switchable"),
        "same name": (["--adapter", f"x={a}", "--adapter", f"x={dora}", "--switchable"], "two adapters are named 'x'"),
        "bad name": (["--adapter", f"a b={a}", "--switchable"], "adapter name 'a b'"),
        "fp16 encoder": (["--adapter", a, "--switchable", "--dtype", "fp16"], "is for decoder graphs"),
    }
    out = tmp_path / "out"
    for name, (extra, msg) in cases.items():
        rc, _, err = run(["export", ck, "-o", out / "m.onnx", *extra])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() or list(out.iterdir()) == [], name


def test_decoder_ids_equal_folded_exports(llama_rtn_export, tiny_llama_sharp_dir, tmp_path):
    """The tiny LLaMA (q/k/v packed in one MatMulNBits): each id's logits equal the folded export
    of that adapter (1e-5 of the logit scale), over the cache too; run/serve select by name."""
    from quantseal.runtime.pipelines import CausalLM
    from quantseal.runtime.server import service_for

    ck, report = llama_rtn_export
    a = peft_lora(tiny_llama_sharp_dir, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_lora(tiny_llama_sharp_dir, tmp_path / "b", 2, r=8, lora_alpha=4, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    sw = tmp_path / "sw" / "model.onnx"
    rc, out, err = run(["export", ck, "-o", sw, "--adapter", f"alpha={a}", "--adapter", f"beta={b}", "--switchable",
                        "--accuracy-level", "0", "--json"])
    assert rc == 0, err
    assert last_json(out)["ops"]["MatMulNBits"] == report["ops"]["MatMulNBits"]  # still packed: one branch per group
    assert (sw.parent / "genai_config.json").is_file()  # onnxruntime-genai runs it: adapter_id by set_model_input
    refs = [report["path"]]
    for name, folder in (("fa", a), ("fb", b)):
        path = tmp_path / name / "model.onnx"
        assert run(["export", ck, "-o", path, "--adapter", folder, "--accuracy-level", "0"])[0] == 0
        refs.append(path)
    ids = np.array([[1, 7592, 2088, 2003, 102, 55, 999, 3231]])
    mask = np.ones_like(ids)
    want = [CausalLM(p, provider="cpu").logits(ids)[0] for p in refs]
    scale = max(np.abs(w).max() for w in want)
    for j, name in enumerate([None, "alpha", "beta"]):
        lm = CausalLM(sw, provider="cpu", adapter=name)
        got = lm.logits(ids)[0]
        assert np.abs(got - want[j]).max() <= 1e-5 * scale, name
        first, past = lm.step(ids[:, :5], mask[:, :5])
        second, _ = lm.step(ids[:, 5:], mask, past)
        assert np.abs(np.concatenate([first, second], 1)[0] - want[j]).max() <= 1e-5 * scale, name
        if j:
            assert np.abs(want[j] - want[0]).max() > 1e-2 * scale  # the adapter changes the logits
    prompt = "the quick brown"
    folded = CausalLM(refs[2], provider="cpu").generate(prompt, 6)
    rc, out, _ = run(["run", sw, "--prompt", prompt, "--max-new-tokens", 6, "--adapter", "beta", "--json"])
    assert rc == 0 and last_json(out)["text"] == folded
    service = service_for(sw, provider="cpu", adapter="beta")
    assert service.generate({"prompt": prompt, "max_new_tokens": 6})["text"] == folded
    rc, _, err = run(["run", sw, "--prompt", prompt, "--adapter", "gamma"])
    assert rc == 2 and "no adapter named 'gamma' (it has alpha, beta)" in err

    # onnxruntime-genai reads the folder unchanged; Generator.set_model_input("adapter_id", j) picks
    # the branch on every step: its greedy tokens equal quantseal's, each adapter's own
    from genai_greedy import og_greedy  # tests/export/genai_greedy.py

    start = [int(t) for t in ids[0, :4]]
    for j, name in enumerate([None, "alpha", "beta"]):
        want_ids = CausalLM(sw, provider="cpu", adapter=name).generate_ids(start, 6)
        assert og_greedy(sw.parent, start, 6, {"adapter_id": np.array(j, dtype=np.int64)}) == want_ids, name
    alone = [CausalLM(sw, provider="cpu", adapter=n).generate_ids(start, 6) for n in (None, "alpha", "beta")]
    assert len({tuple(x) for x in alone}) == 3  # the three branches generate differently
    with pytest.raises(Exception, match="adapter_id"):  # not set: onnxruntime's missing input, never the base
        og_greedy(sw.parent, start, 2)


def test_decoder_float16_graph_for_cuda(llama_rtn_export, tiny_llama_sharp_dir, tmp_path):
    """``--switchable --dtype fp16`` (the CUDA provider's decoder graph): float16 activations, cache
    and logits, float16 factors read with no Cast; every id within float16 rounding of the float32
    switchable file on onnxruntime's CPU kernels, and onnxruntime-genai runs the folder with
    ``set_model_input("adapter_id", j)``."""
    from genai_greedy import og_greedy  # tests/export/genai_greedy.py
    from quantseal.runtime.pipelines import CausalLM

    ck, _ = llama_rtn_export
    a = peft_lora(tiny_llama_sharp_dir, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    paths = {d: tmp_path / d / "model.onnx" for d in ("fp32", "fp16")}
    for d, out in paths.items():
        rc, _, err = run(["export", ck, "-o", out, "--adapter", f"alpha={a}", "--switchable", "--dtype", d,
                          "--accuracy-level", "0"])
        assert rc == 0, err
    proto = onnx.load(str(paths["fp16"]))
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    assert types["logits"] == types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert not [n for n in proto.graph.node if n.op_type == "Cast" and ".adapters." in n.name]  # fp16 factors as stored
    ids = np.array([[1, 7592, 2088, 2003, 102, 55, 999, 3231]])
    full, half = CausalLM(paths["fp32"], provider="cpu"), CausalLM(paths["fp16"], provider="cpu")
    for name in (None, "alpha"):
        x, y = full.logits(ids, adapter=name), half.logits(ids, adapter=name)
        assert 0 < np.abs(x - y).max() <= 1e-2 * np.abs(x).max(), name
    assert np.abs(full.logits(ids, adapter="alpha") - full.logits(ids)).max() > 1e-2 * np.abs(full.logits(ids)).max()
    start = [int(t) for t in ids[0, :4]]
    got = og_greedy(paths["fp16"].parent, start, 1, {"adapter_id": np.array(1, dtype=np.int64)})
    assert got == half.generate_ids(start, 1, adapter="alpha")
