"""`quantseal compress` / `inspect` end to end on a tiny seeded BERT, and every bad input."""

import json
import re
import shutil

import pytest

from quantseal import checkpoint as ckpt
from quantseal.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("budget", ["3.0", "4.5"])
def test_compress_json_and_budget(capsys, tiny_bert_dir, tmp_path, budget):
    code, out, err = run(capsys, "compress", tiny_bert_dir, "-o", tmp_path / "ck", "--budget", budget,
                         "--workers", "1", "--ranks", "0,4", "--json")
    assert code == 0, err
    rep = last_json(out)
    for key in ("bits_per_param", "bytes", "budget", "matrices", "method", "seconds", "output"):
        assert key in rep
    assert rep["matrices"] == 12
    assert rep["bits_per_param"] <= float(budget)
    manifest, tensors = ckpt.read_checkpoint(tmp_path / "ck")
    stored = sum(ckpt.entry_bytes(n, tensors) for n in manifest.matrices)
    assert abs(stored * 8 / manifest.budget["compressible_params"] - rep["bits_per_param"]) < 1e-6


def test_budget_mb_bounds_the_tensor_bytes(capsys, tiny_bert_dir, tmp_path):
    code, out, err = run(capsys, "compress", tiny_bert_dir, "-o", tmp_path / "ck", "--budget-mb", "2.5",
                         "--workers", "1", "--ranks", "0", "--json")
    assert code == 0, err
    rep = last_json(out)
    assert rep["bytes"] <= 2.5e6
    # the file is the tensors plus a small safetensors header
    assert rep["file_bytes"] - rep["bytes"] < 20_000
    manifest, _ = ckpt.read_checkpoint(tmp_path / "ck")
    assert manifest.matrices["embeddings.word_embeddings"].kind == "embedding"
    # the promise is about the exported file: graph, names and metadata included
    code, out, err = run(capsys, "export", tmp_path / "ck", "-o", tmp_path / "model.onnx", "--json")
    assert code == 0, err
    assert (tmp_path / "model.onnx").stat().st_size <= 2.5e6


def test_deterministic_bytes(capsys, tiny_bert_dir, tmp_path):
    for name in ("a", "b"):
        code, _, err = run(capsys, "compress", tiny_bert_dir, "-o", tmp_path / name, "--budget", "3.5",
                           "--workers", "2", "--ranks", "0,4", "--data-aware", "--calib-samples", "16")
        assert code == 0, err
    assert (tmp_path / "a" / ckpt.WEIGHTS).read_bytes() == (tmp_path / "b" / ckpt.WEIGHTS).read_bytes()


def test_inspect(capsys, tiny_bert_dir, tmp_path):
    run(capsys, "compress", tiny_bert_dir, "-o", tmp_path / "ck", "--budget", "4", "--workers", "1", "--ranks", "0")
    code, out, _ = run(capsys, "inspect", tmp_path / "ck", "--json")
    assert code == 0
    rep = last_json(out)
    assert len(rep["matrices"]) == 12 and all(m["bytes"] > 0 for m in rep["matrices"])
    code, out, _ = run(capsys, "inspect", tmp_path / "ck")
    assert "bits/p" in out and "encoder.layer.0.attention.self.query" in out


def one_error_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantseal: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs(capsys, tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    base = ["--workers", "1", "--ranks", "0"]
    # missing folder
    code, _, err = run(capsys, "compress", tmp_path / "nope", "-o", out, "--budget", "4", *base)
    assert code == 2 and "no such" in one_error_line(err).lower() or "not a folder" in err
    # a folder that is not a model
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "compress", tmp_path / "empty", "-o", out, "--budget", "4", *base)
    assert code == 2 and "config.json" in one_error_line(err)
    # a corrupt safetensors file
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_bert_dir, bad)
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    code, _, err = run(capsys, "compress", bad, "-o", out, "--budget", "4", *base)
    assert code == 2 and "cannot load" in one_error_line(err)
    # an unknown format
    code, _, err = run(capsys, "compress", tiny_bert_dir, "-o", out, "--budget", "4", "--formats", "int5", *base)
    assert code == 2 and "int5" in one_error_line(err)
    # a budget below the smallest feasible plan names that minimum
    code, _, err = run(capsys, "compress", tiny_bert_dir, "-o", out, "--budget", "1.0", *base)
    line = one_error_line(err)
    assert code == 2 and "infeasible" in line
    minimum = float(re.search(r"needs ([0-9.]+) bits per parameter", line).group(1))
    assert 2.0 < minimum < 3.0  # int2 codes + their block scales and zero points
    code, _, err = run(capsys, "compress", tiny_bert_dir, "-o", tmp_path / "at_min", "--budget", str(minimum + 1e-4), *base)
    assert code == 0, err  # the named minimum is feasible
    shutil.rmtree(tmp_path / "at_min")
    code, _, err = run(capsys, "compress", tiny_bert_dir, "-o", out, "--budget-mb", "0.5", *base)
    assert code == 2 and " MB" in one_error_line(err)
    # an output path that exists and is not a checkpoint
    (tmp_path / "precious").write_text("keep me")
    code, _, err = run(capsys, "compress", tiny_bert_dir, "-o", tmp_path / "precious", "--budget", "4", *base)
    assert code == 2 and "refusing" in one_error_line(err)
    assert (tmp_path / "precious").read_text() == "keep me"
    # nothing half-written was left behind
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
