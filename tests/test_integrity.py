"""Checkpoint integrity (quantseal/integrity.py through checkpoint.read_checkpoint and the CLI):
file hashes, lying manifests, NaN/Inf, and a source folder missing weights or holding NaN."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantseal import checkpoint as ckpt
from quantseal.errors import BadInput
from quantseal.integrity import file_records

from cli_run import run  # tests/cli_run.py


@pytest.fixture(scope="module")
def tiny_ck(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT through the real CLI, every matrix with a rank-4 branch (``--ranks 4``) and int/fp formats."""
    out = tmp_path_factory.mktemp("integrity") / "ck"
    rc, _, err = run(["compress", tiny_bert_dir, "-o", out, "--budget", "5", "--method", "lq", "--ranks", "4", "--formats", "int2",
                      "--workers", "1", "--calib-samples", "8"])
    assert rc == 0, err
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _tensor_ranges(path):
    """{name: (start, end)} byte ranges of every tensor's data in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _refused(argv_tail, ck, needle, tmp_path):
    """export and inspect both exit 2 with one line naming ``needle``; nothing is written."""
    out = tmp_path / "out" / "model.onnx"
    for argv in (["export", ck, "-o", out], ["inspect", ck]):
        rc, stdout, err = run(argv + argv_tail)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv[0], err)
    assert not (tmp_path / "out").exists()


def test_every_stored_tensor_is_hashed(tiny_ck, tmp_path):
    """A flipped byte in any stored tensor is refused by export (and inspect), naming the file."""
    ck = _copy(tiny_ck, tmp_path / "ck")
    w = ck / ckpt.WEIGHTS
    pristine = w.read_bytes()
    ranges = _tensor_ranges(w)
    assert len(ranges) > 20
    for name, (a, b) in sorted(ranges.items()):
        data = bytearray(pristine)
        data[(a + b) // 2] ^= 0x01
        w.write_bytes(bytes(data))
        with pytest.raises(BadInput, match="sha256"):
            ckpt.read_checkpoint(ck)
    data = bytearray(pristine)
    a, b = ranges[sorted(ranges)[0]]
    data[a] ^= 0x80
    w.write_bytes(bytes(data))
    _refused([], ck, "sha256", tmp_path)
    w.write_bytes(pristine[:-1])  # truncated
    _refused([], ck, "truncated", tmp_path)


def _rewrite(ck, edit_tensors=None, edit_manifest=None):
    """Change tensors and/or the manifest and re-record the hashes (a consistent forgery, so only
    the field checks can catch it)."""
    w = ck / ckpt.WEIGHTS
    if edit_tensors:
        t = load_file(str(w))
        edit_tensors(t)
        save_file(t, str(w), metadata={"format": "pt"})
    d = json.loads((ck / ckpt.MANIFEST).read_text())
    if edit_manifest:
        edit_manifest(d)
    d["files"] = file_records(ck, d["files"])
    (ck / ckpt.MANIFEST).write_text(json.dumps(d))


def _first(d, pred):
    return next(k for k, e in sorted(d["matrices"].items()) if pred(e))


def _lq_name(d):
    return _first(d, lambda e: not e["format"].startswith("fp") and e["rank"] > 0)


@pytest.mark.parametrize("tensor", ["embeddings.word_embeddings.weight", "scales", "embeddings.LayerNorm.weight",
                                    "L1"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_stored_tensor_refused(tiny_ck, tmp_path, tensor, value):
    ck = _copy(tiny_ck, tmp_path / "ck")
    d = json.loads((ck / ckpt.MANIFEST).read_text())
    if tensor in ("scales", "L1"):
        tensor = f"{_lq_name(d)}.{tensor}"

    def edit(t):
        row = t[tensor].clone()
        row.view(-1)[min(7, row.numel() - 1)] = value  # one embedding row / one scale / one norm weight
        t[tensor] = row

    _rewrite(ck, edit)
    with pytest.raises(BadInput, match=f"{tensor} holds 1 NaN/Inf"):
        ckpt.read_checkpoint(ck)
    _refused([], ck, tensor, tmp_path)


def _lie(kind):
    def edit(d):
        lq = _lq_name(d)
        e = d["matrices"][lq]
        if kind == "shape":
            e["shape"] = [e["shape"][0], e["shape"][1] * 2]
        elif kind == "shape_type":
            e["shape"] = "64x64"
        elif kind == "format":
            e["format"] = "int8_b64" if not e["format"].startswith("int8") else "int2_b32"
        elif kind == "format_fp":
            e["format"] = "fp16"
        elif kind == "format_unknown":
            e["format"] = "int5_b64"
        elif kind == "bytes":
            e["bytes"] += 1
        elif kind == "rank":
            e["rank"] += 1
        elif kind == "rank_zero":
            e["rank"] = 0
        elif kind == "rank_negative":
            e["rank"] = -4
        elif kind == "kind":
            e["kind"] = "conv"
        elif kind == "error":
            e["error"] = "small"
        elif kind == "extra_field":
            e["colour"] = "red"
        elif kind == "missing_field":
            del e["bytes"]
        elif kind == "files":
            d["files"] = ["weights.safetensors"]
        elif kind == "budget":
            d["budget"] = 4
        return lq
    return edit


@pytest.mark.parametrize("kind", ["shape", "shape_type", "format", "format_fp", "format_unknown", "bytes", "rank",
                                  "rank_zero", "rank_negative", "kind", "error", "extra_field", "missing_field",
                                  "files", "budget"])
def test_lying_manifest_refused_by_export_and_inspect(tiny_ck, tmp_path, kind):
    ck = _copy(tiny_ck, tmp_path / "ck")
    d = json.loads((ck / ckpt.MANIFEST).read_text())
    lq = _lq_name(d)
    _lie(kind)(d)
    if kind != "files":
        d["files"] = file_records(ck, d["files"])
    (ck / ckpt.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BadInput):
        ckpt.read_checkpoint(ck)
    named = {"shape": lq, "shape_type": lq, "format": lq, "format_fp": lq, "format_unknown": lq,
             "bytes": lq, "rank": lq, "rank_zero": lq, "rank_negative": lq, "kind": lq, "error": lq,
             "extra_field": "colour", "missing_field": "bytes", "files": "files", "budget": "budget"}[kind]
    _refused([], ck, named, tmp_path)


def test_stored_tensor_of_wrong_dtype_refused(tiny_ck, tmp_path):
    ck = _copy(tiny_ck, tmp_path / "ck")
    lq = _lq_name(json.loads((ck / ckpt.MANIFEST).read_text()))

    def edit(t):
        t[f"{lq}.qweight"] = t[f"{lq}.qweight"].to(torch.int8)

    _rewrite(ck, edit)
    _refused([], ck, f"{lq}.qweight", tmp_path)


def test_legacy_checkpoint_without_hashes_still_reads(tiny_ck, tmp_path):
    ck = _copy(tiny_ck, tmp_path / "ck")
    d = json.loads((ck / ckpt.MANIFEST).read_text())
    del d["files"]
    (ck / ckpt.MANIFEST).write_text(json.dumps(d))
    manifest, _ = ckpt.read_checkpoint(ck)
    assert manifest.files == {}


def _source_copy(tiny_bert_dir, tmp_path, edit):
    src = _copy(tiny_bert_dir, tmp_path / "src")
    f = next(src.glob("*.safetensors"))
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("case", ["nan_embedding_row", "inf_layernorm", "missing_weight"])
def test_bad_source_refused_by_compress(tiny_bert_dir, tmp_path, case):
    def edit(t):
        if case == "nan_embedding_row":
            t["embeddings.word_embeddings.weight"][100] = float("nan")
        elif case == "inf_layernorm":
            t["encoder.layer.1.output.LayerNorm.bias"][3] = float("-inf")
        else:
            del t["encoder.layer.0.attention.self.query.weight"]

    keys = load_file(str(next(tiny_bert_dir.glob("*.safetensors"))))
    if case != "missing_weight":
        assert "embeddings.word_embeddings.weight" in keys
    src = _source_copy(tiny_bert_dir, tmp_path, edit)
    out = tmp_path / "ck"
    rc, _, err = run(["compress", src, "-o", out, "--budget", "4", "--method", "rtn", "--workers", "1"])
    named = {"nan_embedding_row": "embeddings.word_embeddings.weight", "inf_layernorm": "encoder.layer.1.output.LayerNorm.bias",
             "missing_weight": "encoder.layer.0.attention.self.query.weight"}[case]
    assert rc == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_int4f_offsets_are_checked_against_the_format():
    """An int4f matrix without its float16 offsets, with the wrong shape, or offsets stored for a
    format without them: one BadInput naming the tensor."""
    from quantseal.compress.formats import Candidate, FormatSpec
    from quantseal.compress.quantizers import quantize
    from quantseal.integrity import check_matrix

    spec = FormatSpec.parse("int4f_b32")
    tensors = ckpt.matrix_tensors("m", spec, quantize(torch.randn(4, 64), spec), None, None, None)
    entry = ckpt.MatrixEntry("int4f_b32", 0, [4, 64], 0.0, Candidate(spec).stored_bytes(4, 64))
    check_matrix("ck", "m", entry, tensors)
    with pytest.raises(BadInput, match="m.offsets named by the manifest is missing"):
        check_matrix("ck", "m", entry, {k: v for k, v in tensors.items() if k != "m.offsets"})
    with pytest.raises(BadInput, match=r"m.offsets has shape \[4, 1\]"):
        check_matrix("ck", "m", entry, dict(tensors, **{"m.offsets": tensors["m.offsets"][:, :1]}))
    spec4 = FormatSpec.parse("int4s_b32")
    plain = ckpt.matrix_tensors("m", spec4, quantize(torch.randn(4, 64), spec4), None, None, None)
    e4 = ckpt.MatrixEntry("int4s_b32", 0, [4, 64], 0.0, Candidate(spec4).stored_bytes(4, 64))
    with pytest.raises(BadInput, match="m.offsets is stored but format int4s_b32 has no float offsets"):
        check_matrix("ck", "m", e4, dict(plain, **{"m.offsets": tensors["m.offsets"]}))
