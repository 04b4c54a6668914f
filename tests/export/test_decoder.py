"""Decoder export (LLaMA family): the ONNX graph holds the plan's low-bit matrices, and
onnxruntime's logits, cache and greedy generation match the torch compressed model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.export.decoder import float_reference_logits
from quantseal.runtime.pipelines import CausalLM

from genai_greedy import og_greedy  # tests/export/genai_greedy.py

PROMPTS = ([101, 7592, 2088], [101, 2023, 2003, 1037, 3231], [101, 1996])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The torch references run on tiny matrices: one thread (two contend badly on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["rtn", "lq"])
def exported(request):
    """(checkpoint, report, torch compressed model, onnxruntime CausalLM) for each method."""
    ck, report = request.getfixturevalue(f"llama_{request.param}_export")
    model, _, _ = load_compressed(ck)
    return ck, report, model, CausalLM(report["path"], provider="cpu")


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding in torch without a cache: argmax over the full sequence's last logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _packed(manifest, layer: int) -> bool:
    """Whether layer ``layer``'s q/k/v share one MatMulNBits (same integer format, no branch)."""
    es = [manifest.matrices[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"]
    return es[0].spec.kind == "int" and all(e.spec == es[0].spec and e.rank == 0 for e in es)


def test_graph_is_the_fused_one(exported):
    ck, report, _, _ = exported
    manifest, _ = read_checkpoint(ck)
    assert report["family"] == "decoder"
    assert report["inputs"] == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                                "past_key_values.1.key", "past_key_values.1.value"]
    assert report["outputs"] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    ops = report["ops"]
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["SimplifiedLayerNormalization"] == 1
    n_int = sum(e.spec.kind == "int" for e in manifest.matrices.values())
    n_nf = sum(e.spec.kind == "nf" for e in manifest.matrices.values())
    packed = sum(_packed(manifest, i) for i in range(2))
    assert report["matrices"] == 14 and n_int + n_nf == 14
    assert ops.get("MatMulNBits", 0) == n_int - 2 * packed
    assert ops.get("MatMulBnb4", 0) == n_nf
    ranked = sum(e.rank > 0 for e in manifest.matrices.values())
    assert ops.get("MatMul", 0) == 2 * ranked  # only low-rank branches: attention is inside GQA
    assert ops["Gemm"] == 1  # the tied head reads the table as stored (transB), no transposed copy
    folder = Path(report["path"]).parent
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}


def test_lq_plan_has_low_rank_branches(llama_lq_export):
    manifest, _ = read_checkpoint(llama_lq_export[0])
    assert any(e.rank > 0 for e in manifest.matrices.values()), "the LQ plan should use the low-rank branch"


def test_matrix_bytes_equal_manifest_and_tied_table_stored_once(exported):
    ck, report, _, _ = exported
    manifest, tensors = read_checkpoint(ck)
    proto = onnx.load(report["path"])
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name, e in manifest.matrices.items():
        stored = {k: v for k, v in tensors.items() if k.startswith(name + ".") and not k.endswith(".bias")}
        layer = name.split(".")[2]
        if name.endswith(("q_proj", "k_proj", "v_proj")) and _packed(manifest, int(layer)):
            # the packed tensor holds q's, k's then v's rows exactly
            rows = {p: manifest.matrices[f"model.layers.{layer}.self_attn.{p}_proj"].shape[0] for p in "qkv"}
            start = {"q": 0, "k": rows["q"], "v": rows["q"] + rows["k"]}[name.split(".")[-1][0]]
            for key, value in stored.items():
                packed = inits[f"model.layers.{layer}.self_attn.qkv_proj.{key.rsplit('.', 1)[1]}"]
                np.testing.assert_array_equal(packed[start:start + value.shape[0]], value.numpy())
            got = sum(v.numpy().nbytes for v in stored.values())
        else:
            got = 0
            for key, value in stored.items():
                arr = inits[key]
                if key.endswith(".qweight") and e.spec.kind == "int":
                    np.testing.assert_array_equal(arr, value.numpy())  # codes byte for byte
                got += arr.nbytes
        assert got == e.bytes
    meta = {p.key: p.value for p in proto.metadata_props}
    assert {n: m["bytes"] for n, m in json.loads(meta["quantseal.matrices"]).items()} == \
        {n: e.bytes for n, e in manifest.matrices.items()}
    vocab_tables = [t for t in proto.graph.initializer if sorted(t.dims) == [64, 30522]]
    assert len(vocab_tables) == 1  # the tied LM head reads the embedding table
    float_bytes = sum(a.nbytes for a in inits.values())
    assert float_bytes < 30522 * 64 * 4 * 1.1


def test_logits_match_torch_on_a_right_padded_batch(exported):
    _, _, model, lm = exported
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012], [101, 2460, 1012, 2003, 102, 0, 0]])
    mask = np.array([[1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    ref = float_reference_logits(model, ids, mask)
    got = lm.logits(ids, mask)
    real = mask.astype(bool)  # a padded position's logits are meaningless
    scale = np.abs(ref[real]).max()
    assert scale > 0.1
    assert np.abs(got[real] - ref[real]).max() <= 1e-4 * scale
    # the padded row equals the same tokens without padding
    alone = lm.logits(ids[1:, :5])
    np.testing.assert_allclose(alone[0], got[1, :5], atol=1e-4 * scale)


def test_cache_step_equals_full_sequence(exported):
    _, _, _, lm = exported
    seq = np.array([[101, 7592, 2088, 2003, 1037, 3231]])
    full = lm.logits(seq)
    first, past = lm.step(seq[:, :4], np.ones((1, 4), dtype=np.int64))
    assert past["past_key_values.0.key"].shape == (1, lm.num_kv_heads, 4, lm.head_dim)
    second, past = lm.step(seq[:, 4:], np.ones((1, 6), dtype=np.int64), past)
    scale = np.abs(full).max()
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, atol=1e-5 * scale)
    assert past["present.1.value".replace("present", "past_key_values")].shape[2] == 6


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_torch(exported, prompt):
    _, _, model, lm = exported
    n = 12
    ref = _torch_greedy(model, prompt, n)
    assert len(set(ref)) >= 3  # a path that moves, so a broken cache would show
    lm.eos_ids = set()  # compare all n tokens (the torch loop does not stop at EOS)
    assert lm.generate_ids(prompt, n) == ref
    assert lm.generate_ids(prompt, n, use_cache=False) == ref


def test_generation_matches_transformers_generate(exported):
    _, _, model, lm = exported
    prompt = list(PROMPTS[1])
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert lm.generate_ids(prompt, 10) == hf[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def quantised_table(llama_mb_export):
    """(checkpoint, report, torch model, CausalLM) of the tiny LLaMA with a planned token table."""
    ck, report = llama_mb_export
    model, _, _ = load_compressed(ck)
    return ck, report, model, CausalLM(report["path"], provider="cpu")


def test_quantised_tied_table_is_one_code_tensor_for_lookup_and_head(quantised_table):
    ck, report, model, lm = quantised_table
    manifest, tensors = read_checkpoint(ck)
    emb = manifest.matrices["model.embed_tokens"]
    assert emb.spec.kind == "int" and "lm_head.weight" not in tensors  # planned, and the head not stored twice
    assert report["bytes"] <= 1.5e6
    proto = onnx.load(report["path"])
    codes = "model.embed_tokens.qweight"
    users = sorted(n.op_type for n in proto.graph.node if codes in n.input)
    assert users == ["MatMulNBits", "Reshape"]  # the head, and the lookup's view of the same bytes
    gbq = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1
    big = [t.name for t in proto.graph.initializer if 30522 in t.dims]
    assert sorted(big) == sorted(f"model.embed_tokens.{s}" for s in ("qweight", "scales", "qzeros")
                                 if f"model.embed_tokens.{s}" in tensors)
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012], [101, 2460, 1012, 2003, 102, 0, 0]])
    mask = np.array([[1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    ref = float_reference_logits(model, ids, mask)
    got = lm.logits(ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() <= 1e-5 * np.abs(ref[real]).max()


def test_onnxruntime_genai_runs_the_export_and_agrees(quantised_table):
    _, report, _, lm = quantised_table
    prompt = list(PROMPTS[1])
    out = og_greedy(Path(report["path"]).parent, prompt, 12)
    assert len(set(out)) >= 3
    lm.eos_ids = set()
    assert lm.generate_ids(prompt, len(out)) == out


def test_decoder_exports_default_to_accuracy_level_4_and_stay_close(llama_rtn_export, tmp_path):
    """The CLI's default for a decoder is int8-activation MatMulNBits (accuracy_level 4: an
    8-bit matrix runs ~80x faster per token on CPU); its logits stay near the level-0 graph's."""
    from quantseal.cli import main

    ck, report = llama_rtn_export
    out = tmp_path / "acc4" / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(ck), "-o", str(out)]) == 0
    levels = {a.i for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    exact, fast = CausalLM(report["path"], provider="cpu"), CausalLM(out, provider="cpu")
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012]])
    a, b = exact.logits(ids), fast.logits(ids)
    assert 0 < np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_float16_graph_for_cuda_runs_and_agrees(llama_rtn_export, tmp_path):
    """``--dtype fp16`` (the CUDA execution provider's graph): float16 inputs, cache and logits,
    MatMulNBits reading the stored float16 scales with no Cast; onnxruntime's CPU kernels run it
    here, within float16 rounding of the float32 graph, and onnxruntime-genai loads the folder."""
    from quantseal.cli import main

    ck, report = llama_rtn_export
    out = tmp_path / "fp16" / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(ck), "-o", str(out), "--dtype", "fp16", "--accuracy-level", "0"]) == 0
    proto = onnx.load(str(out))
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    assert types["logits"] == types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    mnb = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert mnb and all(n.input[2].endswith(".scales") for n in mnb)  # the stored fp16 scales, no Cast
    genai = json.loads((out.parent / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    exact, half = CausalLM(report["path"], provider="cpu"), CausalLM(out, provider="cpu")
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012]])
    a, b = exact.logits(ids), half.logits(ids)
    assert b.dtype == np.float32 and 0 < np.abs(a - b).max() <= 1e-2 * np.abs(a).max()
    seq = ids[:, :5]
    first, past = half.step(seq[:, :3], np.ones((1, 3), dtype=np.int64))
    assert past["past_key_values.0.key"].dtype == np.float16
    second, _ = half.step(seq[:, 3:], np.ones((1, 5), dtype=np.int64), past)
    np.testing.assert_allclose(np.concatenate([first, second], 1), half.logits(seq), atol=2e-3 * np.abs(a).max())
    first = og_greedy(out.parent, list(PROMPTS[1]), 1)
    assert first == [int(np.argmax(half.logits(np.array(PROMPTS[1]))[-1]))]


def test_float16_is_refused_for_an_encoder(minilm_rtn_checkpoint, tmp_path, capsys):
    from quantseal.cli import main

    capsys.readouterr()
    assert main(["export", str(minilm_rtn_checkpoint), "-o", str(tmp_path / "m.onnx"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoder" in err[0] and not (tmp_path / "m.onnx").exists()


def test_inspect_lists_packed_and_shared_matrices_with_manifest_bytes(exported, quantised_table):
    """``quantseal inspect`` on a built decoder: the packed q/k/v appear as their three matrices
    and the tied quantised table once (read by the lookup and the head), each with its manifest bytes."""
    from quantseal.export.inspect_onnx import inspect_onnx

    for ck, report in ((exported[0], exported[1]), (quantised_table[0], quantised_table[1])):
        manifest, _ = read_checkpoint(ck)
        rows = {r["name"]: r for r in inspect_onnx(report["path"])["matrices"]}
        assert set(rows) == set(manifest.matrices)
        for name, e in manifest.matrices.items():
            assert rows[name]["bytes"] == e.bytes and rows[name]["format"] == e.format, name
    rows = {r["name"]: r for r in inspect_onnx(quantised_table[1]["path"])["matrices"]}
    assert rows["model.embed_tokens"]["op"] == "MatMulNBits+GatherBlockQuantized"


# ----------------------------------------------------------------------------- streaming build, external data
def _cli_export(ck, out: Path, *extra: str) -> dict:
    from quantseal.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(ck), "-o", str(out), "--accuracy-level", "0", "--json", *extra]) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_default_export_is_the_in_memory_graph_byte_for_byte(llama_mb_export, tmp_path):
    """The streaming export (tensors read one at a time, bytes spilled to a data file, folded back
    into one file) writes exactly what ``onnx.save_model`` writes for the graph built in memory,
    and the same bytes on every run."""
    from quantseal.export.decoder import build_decoder

    ck, report = llama_mb_export
    manifest, tensors = read_checkpoint(ck)
    proto, _ = build_decoder(manifest, tensors, json.loads((ck / "config.json").read_text()), accuracy_level=0)
    written = onnx.load(report["path"])
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    assert written.graph.SerializeToString() == proto.graph.SerializeToString()
    assert Path(report["path"]).read_bytes() == written.SerializeToString()
    again = Path(_cli_export(ck, tmp_path / "again" / "model.onnx")["path"]).parent
    first = Path(report["path"]).parent
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    for p in first.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_external_data_export_runs_exactly_as_the_one_file_export(llama_mb_export, tmp_path):
    """``--external-data always``: model.onnx holds the graph, model.onnx.data the weights at
    4096-aligned offsets; onnxruntime's logits equal the one-file export's bit for bit and
    onnxruntime-genai generates the same greedy tokens from the folder."""
    from onnx import numpy_helper as nh

    ck, report = llama_mb_export
    folder = tmp_path / "ext"
    rep = _cli_export(ck, folder / "model.onnx", "--external-data", "always")
    assert sorted(p.name for p in folder.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data",
                                                         "tokenizer.json", "tokenizer_config.json"]
    assert rep["bytes"] == (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size
    graph_only = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ext = [t for t in graph_only.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) >= 10 and (folder / "model.onnx").stat().st_size < 100_000
    for t in ext:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx.data" and int(info["offset"]) % 4096 == 0
    one = {t.name: nh.to_array(t) for t in onnx.load(report["path"]).graph.initializer}
    two = {t.name: nh.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012], [101, 2460, 1012, 2003, 102, 0, 0]])
    mask = np.array([[1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    a = CausalLM(report["path"], provider="cpu").logits(ids, mask)
    b = CausalLM(folder / "model.onnx", provider="cpu").logits(ids, mask)
    assert np.array_equal(a, b)
    prompt = list(PROMPTS[1])
    tokens = og_greedy(folder, prompt, 12)
    assert len(set(tokens)) >= 3 and tokens == og_greedy(Path(report["path"]).parent, prompt, 12)
