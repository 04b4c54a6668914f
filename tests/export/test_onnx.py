"""Whole-model export of the real MiniLM: onnxruntime agrees with the torch compressed model,
each matrix's initialisers hold exactly its manifest bytes, and bad inputs fail cleanly."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.cli import main
from quantseal.errors import BadInput
from quantseal.export.inspect_onnx import inspect_onnx
from quantseal.export.onnx import export_onnx, matrix_initializer_bytes, write_model
from quantseal.quality import embed_texts
from quantseal.text import TextTokenizer, pydoc_sentences

pytestmark = pytest.mark.slow
LOWBIT = ("MatMulNBits", "MatMulBnb4")


def held_out(n: int = 16) -> list[str]:
    return pydoc_sentences("evaluation")[:n]


def ort_embed(path: Path, tok: TextTokenizer, texts: list[str]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["sentence_embedding"], tok(texts))[0]


def assert_matches_torch(checkpoint: Path, onnx_path: Path, texts: list[str]) -> None:
    model, _, _ = load_compressed(checkpoint)
    tok = TextTokenizer(checkpoint)
    ref = embed_texts(model, tok, texts)
    got = ort_embed(onnx_path, tok, texts)  # one padded batch
    assert got.shape == ref.shape
    cos = np.sum(ref * got, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    single = np.concatenate([ort_embed(onnx_path, tok, [t]) for t in texts[:3]])  # batch 1, no padding
    assert np.sum(ref[:3] * single, axis=1).min() >= 0.9999


def test_rtn_export_matches_torch(minilm_rtn_checkpoint, minilm_rtn_onnx):
    assert_matches_torch(minilm_rtn_checkpoint, minilm_rtn_onnx, held_out())


def test_rtn_export_ops_and_bytes(minilm_rtn_checkpoint, minilm_rtn_onnx):
    manifest, _ = read_checkpoint(minilm_rtn_checkpoint)
    model = onnx.load(str(minilm_rtn_onnx))
    ops = Counter(n.op_type for n in model.graph.node)
    assert len(manifest.matrices) == 36
    assert sum(ops[o] for o in LOWBIT) == 36
    by_op = Counter(e.spec.onnx_op for e in manifest.matrices.values())
    assert {o: ops[o] for o in LOWBIT} == {o: by_op[o] for o in LOWBIT}
    assert ops["MatMul"] == 12  # attention's QKᵀ and PV only: no float weight matmul is left
    got = matrix_initializer_bytes(model, manifest.matrices)
    assert got == {n: e.bytes for n, e in manifest.matrices.items()}
    names = {t.name for t in model.graph.initializer}
    for n, e in manifest.matrices.items():
        assert f"{n}.qweight" in names and f"{n}.scales" in names
        assert (f"{n}.qzeros" in names) == (e.spec.kind == "int" and not e.spec.symmetric)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["quantseal.family"] == "encoder"
    assert json.loads(meta["quantseal.matrices"]).keys() == manifest.matrices.keys()
    # all-MiniLM-L6-v2's sentence-transformers files: mean pooling, Normalize, max_seq_length 256
    assert (meta["quantseal.pooling"], meta["quantseal.max_seq_length"]) == ("mean+l2", "256")
    assert (minilm_rtn_onnx.parent / "tokenizer.json").is_file()
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]


@pytest.fixture(scope="module")
def mixed_onnx(tmp_path_factory, minilm_mixed_checkpoint):
    out = tmp_path_factory.mktemp("mixed_onnx") / "mixed.onnx"
    report = export_onnx(minilm_mixed_checkpoint, out)
    return out, report


def test_mixed_export_every_format_matches_torch(minilm_mixed_checkpoint, mixed_onnx):
    """int2/3/4/8 affine and symmetric, nf4, fp16/fp32, ranks 0/8/16, quantised embedding + rank."""
    out, report = mixed_onnx
    texts = held_out()
    texts[0] = texts[0] + " " + " ".join(texts[1:6])  # a long row: sequence near 128, others padded
    assert_matches_torch(minilm_mixed_checkpoint, out, texts)
    manifest, _ = read_checkpoint(minilm_mixed_checkpoint)
    model = onnx.load(str(out))
    assert matrix_initializer_bytes(model, manifest.matrices) == {n: e.bytes for n, e in manifest.matrices.items()}
    ops = Counter(n.op_type for n in model.graph.node)
    want = Counter(e.spec.onnx_op for n, e in manifest.matrices.items() if e.kind == "linear")
    assert ops["MatMulNBits"] == want["MatMulNBits"] and ops["MatMulBnb4"] == want["MatMulBnb4"]
    assert ops["GatherBlockQuantized"] == 1
    ranked = sum(1 for e in manifest.matrices.values() if e.rank)
    assert ops["MatMul"] == 12 + want["MatMul"] + 2 * sum(1 for e in manifest.matrices.values() if e.rank and e.kind == "linear") + 1
    assert ranked > 10
    assert report["ops"] == dict(sorted(ops.items()))
    assert report["matrices"] == 37 and report["bytes"] == out.stat().st_size


def test_inspect_onnx_reports_formats_and_bytes(minilm_mixed_checkpoint, mixed_onnx):
    out, _ = mixed_onnx
    manifest, _ = read_checkpoint(minilm_mixed_checkpoint)
    info = inspect_onnx(out)
    rows = {r["name"]: r for r in info["matrices"]}
    assert rows.keys() == manifest.matrices.keys()
    for n, e in manifest.matrices.items():
        assert rows[n]["bytes"] == e.bytes and rows[n]["rank"] == e.rank
        expected = e.format.replace("int3", "int4")  # 3-bit codes run as 4-bit MatMulNBits
        assert rows[n]["format"] == expected, n
    assert info["ops"]["GatherBlockQuantized"] == 1 and info["bytes"] == out.stat().st_size
    assert "MatMulBnb4" in info["text"] and "encoder.layer.5.output.dense" in info["text"]


def test_export_cli_json(minilm_rtn_export, minilm_rtn_onnx):
    res = minilm_rtn_export  # the last stdout line of ``quantseal export ... --json``
    out = minilm_rtn_onnx
    assert res["path"] == str(out) and res["bytes"] == out.stat().st_size and res["matrices"] == 36
    assert res["ops"]["MatMulNBits"] + res["ops"].get("MatMulBnb4", 0) == 36 and res["seconds"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.onnx", "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]  # the tokenizer files: tests/export/test_tokenizer_files.py


# ----------------------------------------------------------------------------- bad inputs
def _no_leftovers(folder: Path, allowed=()) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed)


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quantseal: error:")
    return err[0]


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o" / "m.onnx"
    assert "not a quantseal checkpoint" in _fails(["export", str(tmp_path / "empty"), "-o", str(out)], capsys)
    assert not out.parent.exists()


def test_corrupt_manifest(minilm_rtn_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in minilm_rtn_checkpoint.iterdir():
        os.symlink(f, bad / f.name)
    (bad / "quantseal.json").unlink()
    (bad / "quantseal.json").write_text('{"schema_version": 1, "matrices": {"x": ')
    out = tmp_path / "o"
    out.mkdir()
    assert "manifest" in _fails(["export", str(bad), "-o", str(out / "m.onnx")], capsys)
    _no_leftovers(out)


def test_output_is_a_directory_or_unwritable(minilm_rtn_checkpoint, tmp_path, capsys):
    (tmp_path / "m.onnx").mkdir()
    assert "is a directory" in _fails(["export", str(minilm_rtn_checkpoint), "-o", str(tmp_path / "m.onnx")], capsys)
    (tmp_path / "afile").write_text("x")
    assert "not a directory" in _fails(["export", str(minilm_rtn_checkpoint), "-o", str(tmp_path / "afile" / "m.onnx")],
                                       capsys)
    _no_leftovers(tmp_path, ["m.onnx", "afile"])


def _identity_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """A rename that fails half-way (disk full) leaves neither the model nor temporary files.  The
    folder also holds a file of its own, so the files are renamed in one by one (files mode)."""
    tok = tmp_path / "src" / "tokenizer.json"
    tok.parent.mkdir()
    tok.write_text("{}")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(BadInput, match="No space left"):
        write_model(_identity_model(), out_dir / "m.onnx", tok)
    assert not (out_dir / "m.onnx").exists()
    assert all(not p.name.startswith(".") for p in out_dir.iterdir())
    monkeypatch.setattr(os, "replace", real_replace)
    write_model(_identity_model(), out_dir / "m.onnx", tok)
    _no_leftovers(out_dir, ["m.onnx", "notes.txt", "tokenizer.json"])


def test_failure_while_publishing_a_folder_keeps_the_old_export(tmp_path, monkeypatch):
    """An export folder of its own is swapped in whole; a failure at that step (disk full) leaves
    the previous export as it was and no staging folder beside it."""
    from quantseal.export import publish_export

    tok = tmp_path / "src" / "tokenizer.json"
    tok.parent.mkdir()
    tok.write_text("{}")
    out_dir = tmp_path / "out"
    write_model(_identity_model(), out_dir / "m.onnx", tok)
    before = (out_dir / "m.onnx").read_bytes()

    def full(tmp, out, use_exchange=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish_export, "publish_folder", full)
    other = _identity_model()
    other.doc_string = "the new export"
    with pytest.raises(BadInput, match="No space left"):
        write_model(other, out_dir / "m.onnx", tok)
    assert (out_dir / "m.onnx").read_bytes() == before
    _no_leftovers(tmp_path, ["out", "src"])
    _no_leftovers(out_dir, ["m.onnx", "tokenizer.json"])


def test_decoder_config_over_encoder_tensors_is_bad_input(minilm_rtn_checkpoint, tmp_path):
    # decoders export (tests/export/test_decoder.py); a llama config over BERT tensors is a clear error
    ck = tmp_path / "dec"
    shutil.copytree(minilm_rtn_checkpoint, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="not part of a llama model"):
        export_onnx(ck, tmp_path / "out" / "m.onnx")
    assert not (tmp_path / "out").exists()
