"""Decoder export (LLaMA family): the ONNX graph holds the plan's low-bit matrices, and
onnxruntime's logits, cache and greedy generation match the torch compressed model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.export.decoder import float_reference_logits
from quantseal.runtime.pipelines import CausalLM

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


def test_graph_inputs_outputs_and_ops(exported):
    ck, report, _, _ = exported
    manifest, _ = read_checkpoint(ck)
    assert report["family"] == "decoder"
    assert report["inputs"] == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                                "past_key_values.1.key", "past_key_values.1.value"]
    assert report["outputs"] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    n_int = sum(e.spec.kind == "int" for e in manifest.matrices.values())
    n_nf = sum(e.spec.kind == "nf" for e in manifest.matrices.values())
    assert report["matrices"] == 14 and n_int + n_nf == 14
    assert report["ops"].get("MatMulNBits", 0) == n_int
    assert report["ops"].get("MatMulBnb4", 0) == n_nf
    ranked = sum(e.rank > 0 for e in manifest.matrices.values())
    # the low-rank branch is two MatMuls per ranked matrix; 5 MatMuls remain: 2×(QKᵀ, AV) and the LM head
    assert report["ops"]["MatMul"] == 5 + 2 * ranked


def test_lq_plan_has_low_rank_branches(llama_lq_export):
    manifest, _ = read_checkpoint(llama_lq_export[0])
    assert any(e.rank > 0 for e in manifest.matrices.values()), "the LQ plan should use the low-rank branch"


def test_matrix_bytes_equal_manifest_and_tied_table_stored_once(exported):
    ck, report, _, _ = exported
    manifest, tensors = read_checkpoint(ck)
    proto = onnx.load(report["path"])
    inits = {t.name: t for t in proto.graph.initializer}
    for name, e in manifest.matrices.items():
        stored = {k: v for k, v in tensors.items() if k.startswith(name + ".") and not k.endswith(".bias")}
        got = 0
        for key, value in stored.items():
            arr = numpy_helper.to_array(inits[key])
            if key.endswith(".qweight") and e.spec.kind == "int":
                np.testing.assert_array_equal(arr, value.numpy())  # codes byte for byte
            got += arr.nbytes
        assert got == e.bytes
    meta = {p.key: p.value for p in proto.metadata_props}
    assert {n: m["bytes"] for n, m in json.loads(meta["quantseal.matrices"]).items()} == \
        {n: e.bytes for n, e in manifest.matrices.items()}
    vocab_tables = [t for t in proto.graph.initializer if sorted(t.dims) == [64, 30522]]
    assert len(vocab_tables) == 1  # the tied LM head reads the embedding table
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert float_bytes < 30522 * 64 * 4 * 1.1


def test_logits_match_torch_on_a_padded_batch(exported):
    _, _, model, lm = exported
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 1012], [0, 0, 101, 2460, 1012, 2003, 102]])
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    ref = float_reference_logits(model, ids, mask)
    got = lm.logits(ids, mask)
    real = mask.astype(bool)  # a padded position's logits are meaningless (it attends to nothing)
    scale = np.abs(ref[real]).max()
    assert scale > 0.1
    assert np.abs(got[real] - ref[real]).max() <= 1e-4 * scale
    # the padded row equals the same tokens without padding
    alone = lm.logits(ids[1:, 2:])
    np.testing.assert_allclose(alone[0], got[1, 2:], atol=1e-4 * scale)


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
