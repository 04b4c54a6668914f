"""The runtime: provider choice and fallback, numpy in/out, no torch, and agreement with torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from quantseal.errors import BadInput
from quantseal.runtime.session import Session, available_providers, choose_provider

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.mark.parametrize("asked,available,expected", [
    ("auto", [CUDA, CPU], "cuda"), ("auto", [CPU], "cpu"), ("cpu", [CUDA, CPU], "cpu"),
    ("cuda", [CUDA, CPU], "cuda"), ("CUDA", [CUDA, CPU], "cuda"), ("cuda", [CPU], "cpu"),
])
def test_choose_provider(asked, available, expected):
    assert choose_provider(asked, available) == expected


def test_cuda_fallback_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="quantseal.runtime.session"):
        assert choose_provider("cuda", ["AzureExecutionProvider", CPU]) == "cpu"
    assert "CUDA" in caplog.text and "CPU" in caplog.text
    with pytest.raises(BadInput, match="unknown provider"):
        choose_provider("tpu", [CPU])


def test_bad_model_files(tmp_path):
    with pytest.raises(BadInput, match="no such model file"):
        Session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(BadInput, match="onnxruntime cannot load it"):
        Session(junk)


@pytest.mark.slow
def test_session_runs_and_reports_provider(minilm_rtn_onnx, caplog):
    from quantseal.text import TextTokenizer

    with caplog.at_level(logging.WARNING):
        sess = Session(minilm_rtn_onnx, provider="cuda", threads=1)
    expected = "cuda" if CUDA in available_providers() else "cpu"
    assert sess.provider == expected
    if expected == "cpu":
        assert "running on CPU" in caplog.text
    assert Session(minilm_rtn_onnx, provider="cpu").provider == "cpu"
    assert sess.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    feeds = TextTokenizer(minilm_rtn_onnx.parent)(["One sentence.", "And a second, longer sentence."])
    out = sess.run(dict(feeds, extra=np.zeros(1)))
    assert out["sentence_embedding"].shape == (2, 384) and out["sentence_embedding"].dtype == np.float32
    with pytest.raises(BadInput, match="token_type_ids"):
        sess.run({k: v for k, v in feeds.items() if k != "token_type_ids"})
    assert sess.metadata["quantseal.family"] == "encoder"


@pytest.mark.slow
def test_embedder_matches_torch(minilm_rtn_checkpoint, minilm_rtn_onnx):
    from quantseal.checkpoint import load_compressed
    from quantseal.quality import embed_texts
    from quantseal.runtime.pipelines import Embedder
    from quantseal.text import TextTokenizer, pydoc_sentences

    texts = pydoc_sentences("evaluation")[20:36]
    model, _, _ = load_compressed(minilm_rtn_checkpoint)
    ref = embed_texts(model, TextTokenizer(minilm_rtn_checkpoint), texts)
    emb = Embedder(minilm_rtn_onnx, provider="cpu", batch_size=5)  # several batches, padded
    got = emb.embed(texts)
    assert got.shape == (16, 384) and emb.provider == "cpu"
    assert np.sum(ref * got, axis=1).min() >= 0.9999
    with pytest.raises(BadInput, match="tokenizer.json"):
        Embedder(minilm_rtn_onnx, tokenizer=minilm_rtn_onnx.parent / "nowhere")


@pytest.mark.slow
def test_runtime_imports_no_torch(minilm_rtn_onnx):
    """A device needs only onnxruntime, numpy and tokenizers: importing and running the runtime
    loads neither torch nor transformers nor the compress/export rooms."""
    code = f"""
import sys, json
from quantseal.runtime.session import Session
from quantseal.runtime.pipelines import Embedder
e = Embedder({str(minilm_rtn_onnx)!r}, provider="auto")
v = e.embed(["A sentence on the device."])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
             or m.startswith(("quantseal.compress", "quantseal.export")))
print(json.dumps({{"bad": bad, "shape": list(v.shape)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"bad": [], "shape": [1, 384]}


@pytest.mark.slow
def test_run_cli(minilm_rtn_onnx, tmp_path, capsys):
    from quantseal.cli import main
    from quantseal.runtime.pipelines import Embedder

    texts = ["The first text.", "A second one, a little longer than the first."]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    out = tmp_path / "e.npy"
    assert main(["run", str(minilm_rtn_onnx), "--text-file", str(tmp_path / "in.txt"), "-o", str(out),
                 "--provider", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 2 and res["dim"] == 384 and res["provider"] == "cpu"
    np.testing.assert_allclose(np.load(out), Embedder(minilm_rtn_onnx, provider="cpu").embed(texts), atol=1e-6)
    assert main(["run", str(minilm_rtn_onnx), "--text", texts[0], "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.asarray(res["embeddings"]).shape == (1, 384)
    # bad inputs: one line on stderr, exit 2, nothing written
    (tmp_path / "d.npy").mkdir()
    for argv in (["run", str(tmp_path / "e.npy"), "--text", "x"],
                 ["run", str(minilm_rtn_onnx), "--text", "x", "-o", str(tmp_path / "d.npy")],
                 ["run", str(minilm_rtn_onnx), "--text-file", str(tmp_path / "missing.txt")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("quantseal: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "e.npy", "in.txt"]
