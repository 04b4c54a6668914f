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
    cfg["model_type"] = "phi3"
    (bad / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(bad), "-o", str(tmp_path / "out" / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "phi3" in err[0]
    assert not (tmp_path / "out" / "model.onnx").exists()
