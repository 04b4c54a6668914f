"""``quantseal export-batch``: every customer's file equals a single ``quantseal export --seed``
of that customer, byte for byte, whichever way the batch runs (Ray actors, process pool, serial),
including after a Ray worker dies mid-export; bad input is one line and exit 2 with nothing written."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from quantseal import keys as qk
from quantseal.export import batch

from cli_run import run  # tests/cli_run.py

KEY = bytes(range(32))
SEED = "5"
CUSTOMERS = [f"cust-{i:02d}" for i in range(20)]


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantseal: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def owner(tmp_path_factory, tiny_bert_dir):
    """A tiny LQ checkpoint with rank-4 branches (which every export re-mixes with seeded random
    matrices), a 16-bit board trained briefly on it (its accuracy does not matter here), the key,
    a registry of 20 customers and their ids in a file."""
    import torch

    from quantseal.compress.markboard import BoardConfig, save_board, train_board

    root = tmp_path_factory.mktemp("batch_owner")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, _, err = run(["compress", tiny_bert_dir, "-o", root / "ck", "--budget", "6", "--formats", "int2,int4",
                          "--ranks", "0,4", "--workers", "1"])
        assert rc == 0, err
        board = train_board(root / "ck", KEY, BoardConfig(bits=16, triggers_per_bit=2, steps=4, polish_rounds=1))
    finally:
        torch.set_num_threads(threads)
    save_board(board, root / "board", root / "ck")
    manifest = json.loads((root / "ck" / "quantseal.json").read_text())
    assert any(m["rank"] == 4 for m in manifest["matrices"].values())
    qk.write_key(root / "key", KEY)
    reg = qk.Registry(KEY, 16)
    for c in CUSTOMERS:
        reg.add(c)
    reg.save(root / "reg.json")
    (root / "customers.txt").write_text("# twenty customers\n" + "\n".join(CUSTOMERS) + "\n\n")
    return root


def fresh_board(owner, tmp_path) -> Path:
    """A copy of the board without any ONNX template (the batch must trace once itself)."""
    dst = tmp_path / "board"
    shutil.copytree(owner / "board", dst, ignore=shutil.ignore_patterns("templates"))
    return dst


def mark_args(owner, board):
    return ["--board", board, "--key", owner / "key", "--registry", owner / "reg.json"]


@pytest.fixture(scope="module")
def singles(owner, tmp_path_factory):
    """``quantseal export CK -o REF/<id>/model.onnx --user <id> --seed 5`` for every customer, one by one."""
    ref = tmp_path_factory.mktemp("singles")
    board = fresh_board(owner, ref)
    for c in CUSTOMERS:
        rc, _, err = run(["export", owner / "ck", "-o", ref / c / "model.onnx", *mark_args(owner, board), "--user", c,
                          "--seed", SEED])
        assert rc == 0, err
    return ref


def folder_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_files(out_dir: Path, ref: Path, customers):
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(customers)  # no temporary leftovers
    for c in customers:
        got = folder_files(out_dir / c)
        assert "model.onnx" in got and "tokenizer.json" in got
        assert got == folder_files(ref / c), c


def test_twenty_customers_through_ray_equal_single_exports(owner, singles, tmp_path, ray_local):
    out = tmp_path / "out"
    rc, stdout, err = run(["export-batch", owner / "ck", "--customers", owner / "customers.txt", "-o", out,
                           *mark_args(owner, fresh_board(owner, tmp_path)), "--seed", SEED, "--workers", "2",
                           "--ray", "--json"])
    assert rc == 0, err
    rep = json.loads(stdout.strip().splitlines()[-1])
    assert rep["customers"] == 20 and rep["traced"] == 1 and rep["fanout"] == "ray (local, 2 CPUs)"
    assert rep["files"] == [str(out / c / "model.onnx") for c in CUSTOMERS]
    assert rep["bytes"] == sum((out / c / "model.onnx").stat().st_size for c in CUSTOMERS)
    assert_same_files(out, singles, CUSTOMERS)
    # no two customers share a file: their marks and obfuscations differ
    assert len({(out / c / "model.onnx").read_bytes() for c in CUSTOMERS}) == 20
    from quantseal.runtime.pipelines import Embedder

    emb = Embedder(out / "cust-07" / "model.onnx", provider="cpu").embed(["a batch-exported model runs"])
    assert emb.shape == (1, 64) and np.isfinite(emb).all() and abs(np.linalg.norm(emb) - 1) < 1e-4


@pytest.mark.parametrize("workers", [2, 1])
def test_process_pool_and_serial_batches_equal_single_exports(owner, singles, tmp_path, workers):
    some = CUSTOMERS[3:7]
    (tmp_path / "some.txt").write_text("\n".join(some))
    out = tmp_path / "out"
    rc, stdout, err = run(["export-batch", owner / "ck", "--customers", tmp_path / "some.txt", "-o", out,
                           *mark_args(owner, fresh_board(owner, tmp_path)), "--seed", SEED, "--workers", workers,
                           "--json"])
    assert rc == 0, err
    rep = json.loads(stdout.strip().splitlines()[-1])
    assert rep["traced"] == 1 and rep["fanout"] == ("serial" if workers == 1 else "process pool (2 workers)")
    assert_same_files(out, singles, some)


def export_or_die(inputs, job):
    """``export_one``, except that the worker process dies the first time it meets customer 2."""
    marker_dir, customer, seed = job
    marker = Path(marker_dir) / f"died-{customer}"
    if customer == CUSTOMERS[2] and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    return batch.export_one(inputs, (customer, seed))


def test_a_ray_worker_that_dies_mid_batch_is_restarted_and_its_customer_redone(owner, singles, tmp_path, ray_local):
    from quantseal.distributed import LOCAL, Fanout, fan_out
    from quantseal.export.watermark import template_path
    from quantseal.keys import read_board_manifest

    board = singles / "board"  # its template exists: the singles fixture's first export traced it
    template = template_path(board, read_board_manifest(board))
    assert template.is_file()
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        bundle = batch.bundle_inputs(owner / "ck", board, template, KEY, qk.Registry.load(owner / "reg.json", KEY), 0)
        jobs = [(str(tmp_path), c, batch.obfuscation_seed(int(SEED), c)) for c in CUSTOMERS[:5]]
        reps = fan_out(export_or_die, jobs, Fanout(2, LOCAL, max_retries=2), setup=batch.unpack_inputs,
                       shared=bundle)
    finally:
        ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / f"died-{CUSTOMERS[2]}").exists()
    assert [r["customer"] for r in reps] == CUSTOMERS[:5]
    for r in reps:
        assert r["files"] == folder_files(singles / r["customer"])


def test_seed_is_mixed_with_the_customer_and_absent_means_fresh(owner, tmp_path):
    assert batch.obfuscation_seed(None, "a") is None
    assert batch.obfuscation_seed(5, "a") == batch.obfuscation_seed(5, "a") != batch.obfuscation_seed(5, "b")
    assert batch.obfuscation_seed(5, "a") != batch.obfuscation_seed(6, "a")
    (tmp_path / "two.txt").write_text("cust-00\ncust-01\n")
    board = fresh_board(owner, tmp_path)
    for name in ("x", "y"):  # no --seed: OS randomness, as a single export without --seed
        rc, _, err = run(["export-batch", owner / "ck", "--customers", tmp_path / "two.txt", "-o", tmp_path / name,
                          *mark_args(owner, board), "--workers", "1"])
        assert rc == 0, err
    assert (tmp_path / "x" / "cust-00" / "model.onnx").read_bytes() != (tmp_path / "y" / "cust-00" / "model.onnx").read_bytes()


@pytest.mark.parametrize("content, message", [
    ("cust-00\nnobody\n", "not in the registry"),
    ("cust-00\ncust-00\n", "listed twice"),
    ("cust-00\n../evil\n", "cannot name a file"),
    (".hidden\n", "cannot name a file"),
    ("\n# only a comment\n", "no customer ids"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_bad_customer_files_write_nothing(owner, tmp_path, content, message):
    f = tmp_path / "c.txt"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, _, err = run(["export-batch", owner / "ck", "--customers", f, "-o", tmp_path / "out",
                      *mark_args(owner, owner / "board")])
    assert rc == 2 and message in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_other_bad_inputs(owner, tmp_path):
    args = mark_args(owner, owner / "board")
    rc, _, err = run(["export-batch", owner / "ck", "--customers", tmp_path / "missing.txt", "-o", tmp_path / "o", *args])
    assert rc == 2 and "no such customers file" in one_error_line(err)
    (tmp_path / "file").write_text("x")
    rc, _, err = run(["export-batch", owner / "ck", "--customers", owner / "customers.txt", "-o", tmp_path / "file",
                      *args])
    assert rc == 2 and "not a directory" in one_error_line(err)
    rc, _, err = run(["export-batch", tmp_path, "--customers", owner / "customers.txt", "-o", tmp_path / "o", *args])
    assert rc == 2 and "not a quantseal checkpoint" in one_error_line(err)
    rc, _, err = run(["export-batch", owner / "ck", "--customers", owner / "customers.txt", "-o", tmp_path / "o",
                      *args, "--workers", "0"])
    assert rc == 2 and "--workers" in one_error_line(err)
    rc, _, err = run(["export", owner / "ck", "-o", tmp_path / "m.onnx", "--seed", "3"])
    assert rc == 2 and "--seed" in one_error_line(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists()
