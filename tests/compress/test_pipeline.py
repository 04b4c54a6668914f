"""The LQ + ILP checkpoint is the same file whichever way the candidate table runs: in this process,
on a spawn process pool, or as Ray tasks (a Ray already running in this process, or a local
instance the command starts itself)."""

import json
import os
import subprocess
import sys

import pytest

from quantseal import checkpoint as ckpt
from quantseal.cli import main

TINY = ["--budget", "6", "--formats", "int2,int4", "--ranks", "0,4", "--data-aware", "--calib-samples", "16", "--json"]


def checkpoint_bytes(folder):
    return (folder / ckpt.WEIGHTS).read_bytes(), (folder / ckpt.MANIFEST).read_bytes()


@pytest.fixture(scope="module")
def tiny_serial(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lq_serial") / "ck"
    assert main(["compress", str(tiny_bert_dir), "-o", str(out), "--workers", "1", *TINY]) == 0
    return out


def test_ray_and_process_pool_write_the_serial_bytes(tiny_bert_dir, tiny_serial, tmp_path, ray_local, capsys):
    assert main(["compress", str(tiny_bert_dir), "-o", str(tmp_path / "pool"), "--workers", "2", *TINY]) == 0
    assert main(["compress", str(tiny_bert_dir), "-o", str(tmp_path / "ray"), "--workers", "2", "--ray", *TINY]) == 0
    manifest = json.loads((tiny_serial / ckpt.MANIFEST).read_text())
    ranks = {m["rank"] for m in manifest["matrices"].values()}
    assert len(manifest["matrices"]) == 12 and ranks == {0, 4}  # the plan mixes low-rank and plain candidates
    want = checkpoint_bytes(tiny_serial)
    assert checkpoint_bytes(tmp_path / "pool") == want
    assert checkpoint_bytes(tmp_path / "ray") == want


def test_candidate_errors_are_the_same_floats_every_way(ray_local):
    """Not only the chosen plan: every candidate's error and bytes (low-rank ones through the
    seeded randomized SVD, Fisher-weighted ones too) come back bit-identical and in matrix order."""
    import torch

    from quantseal.compress.formats import expand_families
    from quantseal.compress.pipeline import evaluate_candidates, matrix_candidates
    from quantseal.distributed import LOCAL

    g = torch.Generator().manual_seed(0)
    tasks = []
    for n, k in ((96, 128), (128, 96), (64, 256)):
        w = torch.randn(n, k, generator=g) / k ** 0.5
        fisher = torch.rand(n, k, generator=g) + 0.1 if n == 128 else None
        cands = matrix_candidates(n, k, expand_families(("int2_b32", "int4_b64", "nf4_b64", "fp16")), (0, 4, 16))
        tasks.append((w, fisher, cands, True, 4))
    ticks = []
    serial = evaluate_candidates(tasks, 1, ticks.append)
    assert [len(r) for r in serial] == [len(t[2]) for t in tasks] and ticks == [1, 1, 1]
    assert len({e for r in serial for e, _ in r}) == sum(len(r) for r in serial)  # all distinct: order matters
    assert evaluate_candidates(tasks, 2, lambda n: None) == serial
    assert evaluate_candidates(tasks, 2, lambda n: None, ray=LOCAL) == serial


def test_environment_address_starts_a_local_ray_in_a_fresh_process(tiny_bert_dir, tiny_serial, tmp_path):
    """``QUANTSEAL_RAY_ADDRESS=local`` alone: the command itself starts (and stops) a local Ray."""
    env = {**os.environ, "QUANTSEAL_RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantseal.cli", "compress", str(tiny_bert_dir), "-o",
                           str(tmp_path / "ck"), "--workers", "2", *TINY], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["matrices"] == 12
    assert checkpoint_bytes(tmp_path / "ck") == checkpoint_bytes(tiny_serial)


def test_unreachable_ray_address_is_one_clear_error(tiny_bert_dir, tmp_path):
    pytest.importorskip("ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantseal.cli", "compress", str(tiny_bert_dir), "-o",
                           str(tmp_path / "ck"), "--ranks", "0", "--budget", "4", "--ray=ray://127.0.0.1:9"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("quantseal:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot start or reach Ray" in lines[0]
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_minilm_lq_ilp_through_ray_equals_the_process_pool(minilm_path, tmp_path, ray_local):
    """The issue's acceptance test on the real MiniLM (36 matrices, int4_b64 with and without a
    rank-8 branch: 72 decompositions), through the session's local Ray."""
    args = ["--budget", "4.6", "--formats", "int4_b64", "--ranks", "0,8", "--json"]
    assert main(["compress", str(minilm_path), "-o", str(tmp_path / "pool"), "--workers", "2", *args]) == 0
    assert main(["compress", str(minilm_path), "-o", str(tmp_path / "ray"), "--workers", "2", "--ray", *args]) == 0
    manifest = json.loads((tmp_path / "ray" / ckpt.MANIFEST).read_text())
    assert len(manifest["matrices"]) == 36 and any(m["rank"] == 8 for m in manifest["matrices"].values())
    assert checkpoint_bytes(tmp_path / "ray") == checkpoint_bytes(tmp_path / "pool")
