"""The torch-free embedder (quantseal/runtime/pipelines.py) against sentence-transformers itself:
truncation length, pooling, normalisation and lowercasing follow the model's
sentence-transformers files (issue 13, part 6)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from quantseal.cli import main
from quantseal.errors import BadInput
from quantseal.runtime.pipelines import Embedder
from quantseal.sbert import Conventions

st = pytest.importorskip("sentence_transformers")

TARGET_TOKENS = (20, 60, 130, 188, 300, 463, 500)


def _one_minus_cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1.0 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _fp32_export(root: Path, model_dir: Path) -> Path:
    """``quantseal compress --formats fp32 --ranks 0`` (every matrix kept float32) + export."""
    ck, out = root / "ck", root / "onnx" / "model.onnx"
    assert main(["compress", str(model_dir), "-o", str(ck), "--budget", "32", "--method", "rtn", "--formats", "fp32",
                 "--ranks", "0", "--workers", "1", "--json"]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(ck), "-o", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def texts(minilm_path) -> list[str]:
    """Prose of exactly TARGET_TOKENS tokens (special tokens included; 463 where 462 + 1 word
    would overshoot), cut from pydoc_data by bisection on the word count."""
    from tokenizers import Tokenizer

    from quantseal.text import pydoc_sentences

    raw = Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    raw.no_truncation()
    raw.no_padding()
    words = " ".join(pydoc_sentences("evaluation")).split()
    out = []
    for target in TARGET_TOKENS:
        lo, hi = 1, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(raw.encode(" ".join(words[:mid])).ids) <= target else (lo, mid - 1)
        out.append(" ".join(words[:lo]))
    lengths = [len(raw.encode(t).ids) for t in out]
    assert all(t - 2 <= n <= t for n, t in zip(lengths, TARGET_TOKENS)) and lengths[-1] == 500, lengths
    return out


@pytest.fixture(scope="module")
def minilm_fp32_onnx(tmp_path_factory, minilm_path) -> Path:
    return _fp32_export(tmp_path_factory.mktemp("minilm_fp32"), minilm_path)


@pytest.mark.slow
def test_float32_export_matches_sentence_transformers(minilm_fp32_onnx, minilm_path, texts):
    """The done-when test: 1−cos ≤ 1e-6 against ``SentenceTransformer.encode`` on 20–500 tokens,
    at the model's own max_seq_length (256) and with both raised to 512 (the 500-token text whole)."""
    model = st.SentenceTransformer(str(minilm_path), device="cpu")
    emb = Embedder(minilm_fp32_onnx, provider="cpu")
    assert emb.max_length == model.max_seq_length == 256
    ref = model.encode(texts, batch_size=4)
    got = emb.embed(texts)
    assert got.shape == ref.shape == (len(texts), 384)
    assert _one_minus_cos(got, ref).max() <= 1e-6
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5  # Normalize is in the module chain

    model.max_seq_length = 512
    got512 = Embedder(minilm_fp32_onnx, provider="cpu", max_length=512).embed(texts)
    assert _one_minus_cos(got512, model.encode(texts, batch_size=4)).max() <= 1e-6
    # the 500-token text is not truncated at 512 and is at 256: the length really is applied
    assert _one_minus_cos(got512[-1:], got[-1:])[0] > 1e-3
    # the old fixed truncation at 128 is far from sentence-transformers on long texts (issue 13)
    old = Embedder(minilm_fp32_onnx, provider="cpu", max_length=128).embed(texts[3:])
    assert _one_minus_cos(old, ref[3:]).min() > 1e-3


def _st_folder(root: Path, tiny_bert_dir: Path, pooling: dict, normalize: bool, sbert: dict,
               cased: bool) -> Path:
    """A sentence-transformers folder around the tiny BERT: modules.json, sentence_bert_config.json,
    1_Pooling/config.json; ``cased``: its tokenizer.json without BertNormalizer's lowercasing."""
    f = root / "st"
    f.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_bert_dir / name, f / name)
    tok = json.loads((tiny_bert_dir / "tokenizer.json").read_text())
    if cased:
        tok["normalizer"]["lowercase"] = False
    (f / "tokenizer.json").write_text(json.dumps(tok))
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (f / "modules.json").write_text(json.dumps(mods))
    (f / "sentence_bert_config.json").write_text(json.dumps(sbert))
    (f / "1_Pooling").mkdir()
    (f / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))
    return f


TINY_CASES = {
    # cls + max concatenated, no Normalize, a cased tokenizer lowercased by do_lower_case, 40 tokens
    "cls,max": ({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}, False,
                {"max_seq_length": 40, "do_lower_case": True}, True),
    "mean_sqrt_len_tokens+l2": ({"pooling_mode": "mean_sqrt_len_tokens"}, True,
                                {"max_seq_length": 100, "do_lower_case": False}, False),
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_conventions_follow_sentence_transformers_files(case, tmp_path, tiny_bert_dir, texts):
    pooling, normalize, sbert, cased = TINY_CASES[case]
    folder = _st_folder(tmp_path, tiny_bert_dir, pooling, normalize, sbert, cased)
    out = _fp32_export(tmp_path, folder)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["quantseal.pooling"] == case and meta["quantseal.max_seq_length"] == str(sbert["max_seq_length"])
    model = st.SentenceTransformer(str(folder), device="cpu")
    sample = ["Hello World, THIS is Mixed Case.", "short", texts[1], texts[2]]
    emb = Embedder(out, provider="cpu")
    assert emb.max_length == model.max_seq_length == sbert["max_seq_length"]
    got, ref = emb.embed(sample), model.encode(sample)
    assert got.shape == ref.shape == (4, 64 * len(case.split("+")[0].split(",")))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    if not normalize:
        assert np.abs(np.linalg.norm(got, axis=1) - 1).min() > 1e-2
    if sbert["do_lower_case"]:  # the tokenizer.json alone would keep the capitals
        from quantseal.text import TextTokenizer

        assert TextTokenizer(folder).encode_ids(sample[0]) != emb.tokenizer.encode_ids(sample[0])


def test_max_length_is_checked(minilm_rtn_onnx, tmp_path):
    emb = Embedder(minilm_rtn_onnx, provider="cpu", max_length=512)
    assert emb.max_length == 512
    with pytest.raises(BadInput, match="exceeds the model's 512 positions"):
        Embedder(minilm_rtn_onnx, provider="cpu", max_length=513)
    with pytest.raises(BadInput, match="at least 2"):
        Embedder(minilm_rtn_onnx, provider="cpu", max_length=1)
    p = subprocess.run([sys.executable, "-m", "quantseal.cli", "run", str(minilm_rtn_onnx), "--text", "hi",
                        "--max-length", "9999"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "9999" in p.stderr
    p = subprocess.run([sys.executable, "-m", "quantseal.cli", "run", str(minilm_rtn_onnx), "--text", "hi",
                        "--max-length", "64", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["max_length"] == 64


def test_serve_max_length_reaches_the_embedder(minilm_rtn_onnx):
    from quantseal.cli import build_parser
    from quantseal.runtime.server import service_for

    args = build_parser().parse_args(["serve", str(minilm_rtn_onnx), "--max-length", "64"])
    assert args.max_length == 64
    assert service_for(minilm_rtn_onnx, provider="cpu", max_length=args.max_length).embedder.max_length == 64
    assert service_for(minilm_rtn_onnx, provider="cpu").embedder.max_length == 256


def test_file_without_conventions_keeps_the_old_length(minilm_rtn_onnx, tmp_path):
    """A file exported before the conventions were recorded: mean + L2 (in its graph) at 128."""
    proto = onnx.load(str(minilm_rtn_onnx))
    recorded = set(Conventions().metadata()) - {"quantseal.pooling"}  # "quantseal.pooling" predates them
    keep = [p for p in proto.metadata_props if p.key not in recorded | {"quantseal.max_position_embeddings"}]
    assert len(keep) == len(proto.metadata_props) - 4
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    shutil.copyfile(minilm_rtn_onnx.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    emb = Embedder(tmp_path / "old.onnx", provider="cpu")
    assert emb.max_length == 128 and emb.conventions.source == "legacy"
    long = " ".join(["word"] * 300)
    np.testing.assert_allclose(emb.embed([long]), Embedder(minilm_rtn_onnx, provider="cpu", max_length=128).embed([long]),
                               atol=1e-6)
