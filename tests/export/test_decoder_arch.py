"""The built decoder graph for each supported architecture (tiny seeded transformers configs):
onnxruntime's logits equal the torch compressed model's, one cached decode step equals a full
recompute, onnxruntime-genai greedy text equals quantseal's runtime, and an unsupported
architecture is refused with one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

from quantseal.checkpoint import load_compressed
from quantseal.cli import main
from quantseal.export.decoder import float_reference_logits
from quantseal.export.decoder_arch import arch_of, inverse_frequencies
from quantseal.runtime.pipelines import CausalLM

from genai_greedy import og_greedy  # tests/export/genai_greedy.py

VOCAB = 512


def _config(kind: str):
    """A 2-layer, 64-wide config of ``kind`` with the feature that sets it apart switched on."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
    if kind == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return LlamaConfig(**common, rope_parameters=rope)
    if kind == "mistral":
        return MistralConfig(**dict(common, tie_word_embeddings=False), sliding_window=4)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    raise AssertionError(kind)


@pytest.fixture(scope="module", params=["llama3", "mistral", "qwen2", "qwen3"])
def arch_export(request, tmp_path_factory, minilm_path):
    """(torch compressed model, CausalLM, export folder) for one architecture at 8 bits."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(request.param)).eval()
        with torch.no_grad():  # sharpen: random-init attention is near uniform, biases are zero
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
                elif "layers" in name and p.ndim == 2:
                    p.mul_(5.0)
        root = tmp_path_factory.mktemp(request.param)
        model.save_pretrained(root / "src", safe_serialization=True)
        shutil.copyfile(minilm_path / "tokenizer.json", root / "src" / "tokenizer.json")  # ids only are used
        ck, onnx_path = root / "ck", root / "onnx" / "model.onnx"
        assert main(["compress", str(root / "src"), "-o", str(ck), "--method", "rtn", "--budget", "8",
                     "--workers", "1", "--json"]) == 0
        assert main(["export", str(ck), "-o", str(onnx_path), "--json", "--accuracy-level", "0"]) == 0
        compressed, _, _ = load_compressed(ck)
    finally:
        torch.set_num_threads(threads)
    return request.param, compressed, CausalLM(onnx_path, provider="cpu"), onnx_path.parent


def test_logits_equal_torch_on_a_right_padded_batch(arch_export):
    kind, model, lm, _ = arch_export
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding: row 1 has 6 real tokens
    ref = float_reference_logits(model, ids, mask)
    got = lm.logits(ids, mask)
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    assert scale > 0.5
    assert np.abs(got[real] - ref[real]).max() <= 2e-5 * scale, kind
    assert lm.session.metadata["quantseal.architecture"] == kind.replace("llama3", "llama")


def test_cached_steps_equal_a_full_recompute(arch_export):
    _, _, lm, _ = arch_export
    seq = np.random.default_rng(1).integers(0, VOCAB, size=(1, 8))
    full = lm.logits(seq)
    logits, past = lm.step(seq[:, :5], np.ones((1, 5), dtype=np.int64))
    steps = [logits]
    for t in range(5, 8):
        logits, past = lm.step(seq[:, t:t + 1], np.ones((1, t + 1), dtype=np.int64), past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5 * np.abs(full).max())


def test_onnxruntime_genai_greedy_equals_quantseal_runtime(arch_export):
    kind, _, lm, folder = arch_export
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg["model"]["type"] == kind.replace("llama3", "llama")
    prompt = [5, 17, 300, 41, 9]
    out = og_greedy(folder, prompt, 10)
    assert len(set(out)) >= 3
    assert lm.generate_ids(prompt, len(out)) == out


def test_llama3_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _config("llama3")
    ours = inverse_frequencies(arch_of(cfg.to_dict()))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-6)
    assert not np.allclose(ours, inverse_frequencies(arch_of({**cfg.to_dict(), "rope_parameters": None,
                                                              "rope_scaling": None, "rope_theta": 500000.0})))


def test_unsupported_architecture_is_one_line_and_exit_2(llama_rtn_export, tmp_path, capsys):
    ck, _ = llama_rtn_export
    bad = tmp_path / "ck"
    shutil.copytree(ck, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gemma"
    (bad / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(bad), "-o", str(tmp_path / "out" / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gemma" in err[0]
    assert not (tmp_path / "out" / "model.onnx").exists()


# ----------------------------------------------------------------------------- Phi-3
ORIGINAL = 16  # the longrope config's original_max_position_embeddings: longer sequences use the long factors


def _phi3_config(kind: str):
    """A 2-layer Phi-3: ``phi3`` (untied head, sliding window 4, full rotary) or ``phi3-longrope``
    (the Phi-4-mini shape: tied table, partial_rotary_factor 0.5 of head_dim 32, longrope with
    short/long factors switching beyond 16 positions)."""
    from transformers import Phi3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "phi3":
        return Phi3Config(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                          original_max_position_embeddings=128)  # as Phi-3-mini-4k: no longrope
    rope = {"type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)],
            "long_factor": [2.0 + 1.5 * i for i in range(8)]}
    return Phi3Config(**common, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      partial_rotary_factor=0.5, original_max_position_embeddings=ORIGINAL, rope_scaling=rope)


PHI3_PLANS = {"fp32": ["--formats", "fp32", "--budget", "32"], "int4": ["--formats", "int4", "--budget", "5"]}


@pytest.fixture(scope="module", params=["phi3/fp32", "phi3/int4", "phi3-longrope/fp32", "phi3-longrope/int4"])
def phi3_export(request, tmp_path_factory, minilm_path):
    """(kind, plan, source torch model, torch compressed model, CausalLM, export folder, checkpoint)
    of a seeded tiny Phi-3 kept in float32 or compressed to int4 (rtn)."""
    from transformers import AutoModelForCausalLM

    kind, plan = request.param.split("/")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_phi3_config(kind)).eval()
        with torch.no_grad():  # sharpen: random-init attention is near uniform
            for name, p in model.named_parameters():
                if "layers" in name and p.ndim == 2:
                    p.mul_(5.0)
        root = tmp_path_factory.mktemp(f"{kind}_{plan}")
        model.save_pretrained(root / "src", safe_serialization=True)
        shutil.copyfile(minilm_path / "tokenizer.json", root / "src" / "tokenizer.json")  # ids only are used
        ck, onnx_path = root / "ck", root / "onnx" / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["compress", str(root / "src"), "-o", str(ck), "--method", "rtn", *PHI3_PLANS[plan],
                         "--workers", "1", "--json"]) == 0
            assert main(["export", str(ck), "-o", str(onnx_path), "--json", "--accuracy-level", "0"]) == 0
        compressed, _, _ = load_compressed(ck)
    finally:
        torch.set_num_threads(threads)
    return kind, plan, model, compressed, CausalLM(onnx_path, provider="cpu"), onnx_path.parent, ck


def test_phi3_graph_reads_the_fused_matrices_as_stored(phi3_export):
    """qkv_proj and gate_up_proj are one planned matrix each (one MatMulNBits each at int4, the
    codes byte for byte), gate/up split after the MatMul; longrope holds both table pairs."""
    import onnx
    from onnx import numpy_helper

    from quantseal.checkpoint import read_checkpoint
    from quantseal.export.decoder_arch import graph_table_bytes

    kind, plan, _, _, _, folder, ck = phi3_export
    manifest, tensors = read_checkpoint(ck)
    assert sorted({n.split(".", 3)[3] for n in manifest.matrices}) == \
        ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]
    assert {e.format for e in manifest.matrices.values()} == {"fp32" if plan == "fp32" else "int4_b32"}
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("Split") == 2
    if plan == "int4":
        assert ops.count("MatMulNBits") == 8  # 4 per layer: qkv, o, gate_up, down
        name = "model.layers.1.self_attn.qkv_proj.qweight"
        np.testing.assert_array_equal(inits[name], tensors[name].numpy())
    longrope = kind == "phi3-longrope"
    assert ops.count("If") == int(longrope)
    names = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    if longrope:  # rotary dimension 16 of head_dim 32: 8 columns; short table to 16 rows, long to 128
        assert names["cos_cache_small"] == (ORIGINAL, 8) and names["cos_cache_large"] == (128, 8)
    else:
        assert names["cos_cache"] == (128, 8)
    tables = sum(a.nbytes for n, a in inits.items() if n.startswith(("cos_", "sin_")))
    assert tables == graph_table_bytes(arch_of(json.loads((ck / "config.json").read_text())))  # what --budget-mb counts
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "phi3"


@pytest.mark.parametrize("length", [9, 30])
def test_phi3_logits_equal_torch(phi3_export, length):
    """Right-padded batch; 30 tokens is past the sliding window (4) and past longrope's switch (16)."""
    kind, plan, source, model, lm, _, _ = phi3_export
    rng = np.random.default_rng(length)
    ids = rng.integers(0, VOCAB, size=(2, length))
    mask = np.ones_like(ids)
    mask[1, length - 3:] = 0
    ref = float_reference_logits(model, ids, mask)
    real = mask.astype(bool)
    if plan == "fp32":  # the float checkpoint is the source model itself
        np.testing.assert_array_equal(float_reference_logits(source, ids, mask)[real], ref[real])
    got = lm.logits(ids, mask)
    scale = np.abs(ref[real]).max()
    assert scale > 0.3
    assert np.abs(got[real] - ref[real]).max() <= 2e-5 * scale, (kind, plan)


def test_phi3_cached_steps_equal_a_full_recompute(phi3_export):
    """Within one rope regime (all ≤ 16 positions, or a prompt already past 16) a prefill and cached
    one-token steps equal the full sequence's logits."""
    _, _, _, _, lm, _, _ = phi3_export
    rng = np.random.default_rng(1)
    for start, end in ((5, 12), (20, 26)):
        seq = rng.integers(0, VOCAB, size=(1, end))
        full = lm.logits(seq)
        logits, past = lm.step(seq[:, :start], np.ones((1, start), dtype=np.int64))
        steps = [logits]
        for t in range(start, end):
            logits, past = lm.step(seq[:, t:t + 1], np.ones((1, t + 1), dtype=np.int64), past)
            steps.append(logits)
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5 * np.abs(full).max())


def test_phi3_longrope_cache_across_the_switch_equals_transformers_cache(phi3_export):
    """A cached decode that crosses longrope's original_max_position_embeddings keeps the keys it
    rotated with the short factors, exactly as transformers' own cached forward does (and
    onnxruntime-genai's builder graph): equal to torch step by step, and not equal to a full
    recompute (transformers' ``generate`` drops its cache at the switch; the graph cannot).
    Without longrope the same steps equal torch and a full recompute."""
    from transformers import DynamicCache

    kind, _, _, model, lm, _, _ = phi3_export
    seq = np.random.default_rng(2).integers(0, VOCAB, size=(1, 22))
    start = 12
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(seq[:, :start]), cache=cache, use_cache=True)
        ref = [out.logits[:, -1:].numpy()]
        for t in range(start, seq.shape[1]):
            out = model(input_ids=torch.from_numpy(seq[:, t:t + 1]), cache=cache, use_cache=True,
                        position_ids=torch.tensor([[t]]))
            ref.append(out.logits.numpy())
    logits, past = lm.step(seq[:, :start], np.ones((1, start), dtype=np.int64))
    got = [logits[:, -1:]]
    for t in range(start, seq.shape[1]):
        logits, past = lm.step(seq[:, t:t + 1], np.ones((1, t + 1), dtype=np.int64), past)
        got.append(logits)
    ref, got = np.concatenate(ref, 1), np.concatenate(got, 1)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 2e-5 * scale
    full = lm.logits(seq)[:, start - 1:]
    if kind == "phi3-longrope":  # past the switch the cache is not a recompute
        assert np.abs(full[:, -1] - got[:, -1]).max() > 1e-3 * scale
    else:  # one table: it is
        np.testing.assert_allclose(got, full, atol=1e-5 * scale)


def test_phi3_onnxruntime_genai_greedy_equals_quantseal_runtime(phi3_export):
    kind, _, _, _, lm, folder, _ = phi3_export
    prompt = [5, 17, 300, 41, 9, 77, 120, 33, 250, 8, 64, 19]  # + 10 new tokens: past longrope's switch
    out = og_greedy(folder, prompt, 10)
    assert len(set(out)) >= 3
    lm.eos_ids = set()
    assert lm.generate_ids(prompt, len(out)) == out


def test_longrope_tables_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from quantseal.export.decoder_arch import attention_factor, rope_tables

    cfg = _phi3_config("phi3-longrope")
    arch = arch_of(cfg.to_dict())
    assert arch.rotated == 16 and arch.rope_switch == ORIGINAL and arch.fused and arch.tied
    for long in (False, True):
        ref, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=ORIGINAL + 1 if long else None)
        np.testing.assert_allclose(inverse_frequencies(arch, long), ref.double().numpy(), rtol=1e-6)
        assert attention_factor(arch) == pytest.approx(factor, rel=1e-12) and factor > 1.1
    cos, sin = rope_tables(arch, 40, long=True)
    np.testing.assert_allclose(cos[39, 3], factor * np.cos(39 * ref[3].item()), rtol=1e-5)
    assert not np.allclose(inverse_frequencies(arch, True), inverse_frequencies(arch, False))


@pytest.mark.parametrize("change, word", [
    ({"partial_rotary_factor": 0.25}, "multiple of 16"),
    ({"model_type": "llama"}, "phi3 only"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_phi3_variants_not_exported_are_refused_by_name(change, word):
    from quantseal.errors import Unsupported

    cfg = {**_phi3_config("phi3-longrope").to_dict(), **change}
    if "partial_rotary_factor" in change:
        cfg["rope_parameters"] = {**cfg["rope_parameters"], **change}
    if "rope_scaling" in change:
        cfg["rope_parameters"] = None
    with pytest.raises(Unsupported, match=word):
        arch_of(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("phi3_export", ["phi3/fp32", "phi3-longrope/fp32"], indirect=True)
def test_phi3_float_graph_equals_onnxruntime_genai_builders(phi3_export, tmp_path):
    """The same float Phi-3 built by onnxruntime-genai's model builder (its Phi3MiniModel /
    Phi3MiniLongRoPEModel) gives the logits quantseal's graph gives, below and past longrope's
    switch.  The builder leaves Phi-3's sliding window out (local_window_size -1, where
    transformers applies it), so the windowed model is compared within its window (4)."""
    import onnxruntime as ort

    builder = pytest.importorskip("onnxruntime_genai.models.builder")
    kind, _, _, _, lm, _, ck = phi3_export
    args = ("", str(ck.parent / "src"), str(tmp_path / "og"), "fp32", "cpu", str(tmp_path / "cache"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        builder.create_model(*args, **builder.parse_extra_options(*args, []))  # what its __main__ does
    sess = ort.InferenceSession(str(tmp_path / "og" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads((tmp_path / "og" / "genai_config.json").read_text())["model"]["type"] == "phi3"
    d = lm.head_dim
    for length in ((3, 4) if kind == "phi3" else (10, 30)):
        ids = np.random.default_rng(length).integers(0, VOCAB, size=(1, length))
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feed.update({i.name: np.zeros((1, lm.num_kv_heads, 0, d), np.float32) for i in sess.get_inputs()
                     if i.name.startswith("past_key_values")})
        theirs = sess.run(["logits"], feed)[0]
        assert np.abs(lm.logits(ids) - theirs).max() <= 2e-6 * np.abs(theirs).max(), (kind, length)
