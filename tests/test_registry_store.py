"""The registry on a real PostgreSQL server (quantseal/registry_store.py, ``postgresql://``): the same
guarantees as the SQLite file.  Runs where psycopg (``quantseal[postgres]``) and the server
binaries (initdb, pg_ctl) are installed; a throwaway server on a Unix socket is started for the
module."""

import json
import multiprocessing as mp
import os
import pwd
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from quantseal import keys as qk
from quantseal.errors import BadInput
from quantseal.registry import RegistryDB, import_registry, open_registry

from cli_run import run  # tests/cli_run.py

psycopg = pytest.importorskip("psycopg")

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))


@pytest.fixture(scope="module")
def pg_server():
    """(socket dir, port) of a fresh PostgreSQL cluster, stopped and deleted afterwards."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    prefix = []
    d = tempfile.mkdtemp(prefix="qs-pg-", dir="/tmp")  # short: a Unix socket path has ~100 bytes
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(d)
            pytest.skip("running as root and no 'postgres' user to run the server")
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", pw.pw_name, "--"]
    port = 50000 + os.getpid() % 10000
    data = os.path.join(d, "data")
    subprocess.run(prefix + [initdb, "-D", data, "-A", "trust", "-U", "postgres"], check=True, capture_output=True,
                   cwd="/tmp")
    subprocess.run(prefix + [pg_ctl, "-D", data, "-l", os.path.join(d, "log"), "-w", "-o",
                             f"-k {d} -c listen_addresses='' -p {port}", "start"], check=True, capture_output=True,
                   cwd="/tmp")
    try:
        yield d, port
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-w", "-m", "immediate", "stop"], capture_output=True, cwd="/tmp")
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server, request):
    """A fresh database on the server for one test."""
    d, port = pg_server
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    admin = f"postgresql://postgres@/postgres?host={d}&port={port}"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {name}")
        con.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@/{name}?host={d}&port={port}"


def _adder(args):
    url, keyfile, worker, n = args
    for i in range(n):
        rc, _, err = run(["registry", "add", url, "--key", keyfile, "--user", f"w{worker}-c{i}"])
        assert rc == 0, err
    return n


@pytest.mark.slow
def test_eight_processes_concurrent_adds_lose_nothing(pg_url, tmp_path):
    """8 processes x 15 CLI adds (a connection each) on the server (the SQLite test does 8 x 50)."""
    keyfile = tmp_path / "owner.key"
    qk.write_key(keyfile, KEY)
    with mp.get_context("spawn").Pool(8) as pool:  # spawned: see test_registry.py
        assert sum(pool.map(_adder, [(pg_url, str(keyfile), w, 15) for w in range(8)])) == 120
    view = open_registry(pg_url, KEY)
    ids, mat = view.matrix()
    assert len(view) == 120 and sorted(ids) == sorted(f"w{w}-c{i}" for w in range(8) for i in range(15))
    d = (mat[:, None, :] != mat[None, :, :]).sum(-1)
    assert d[np.triu_indices(120, 1)].min() >= 16
    ref = qk.Registry(KEY, 64)
    assert all(np.array_equal(ref.add(c), code) for c, code in zip(ids, mat))


def test_tamper_wrong_key_tombstone_import(pg_url, tmp_path):
    db = RegistryDB(pg_url, KEY)
    for c in ("alice", "bob", "carol"):
        db.add(c, 32)
    db.remove("bob")
    with pytest.raises(BadInput, match="never reused"):
        db.add("bob")
    view = db.snapshot()
    assert view.customers() == ["alice", "carol"] and view.matrix()[0] == ["alice", "bob", "carol"]
    with pytest.raises(BadInput, match="another key"):
        RegistryDB(pg_url, KEY2).snapshot()
    # a JSON registry imported next to them keeps its codewords
    legacy = qk.Registry(KEY, 32, path=tmp_path / "old.json")
    ref = qk.Registry(KEY, 32)
    for c in ("alice", "bob", "carol"):
        ref.add(c)
    legacy._codes = {c: ref.codeword(c) for c in ("alice",)}
    legacy.save()
    assert import_registry(tmp_path / "old.json", pg_url, KEY) == (0, 1)
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute("UPDATE registry_customers SET status = 'active' WHERE seq = 2")
    with pytest.raises(BadInput, match="row 2"):
        db.snapshot()
    keyfile = tmp_path / "k"
    qk.write_key(keyfile, KEY)
    rc, out, err = run(["registry", "list", pg_url, "--key", keyfile, "--json"])
    assert rc == 2 and "row 2" in err and len(err.strip().splitlines()) == 1
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute("DELETE FROM registry_customers WHERE seq = 3")
        con.execute("UPDATE registry_customers SET status = 'removed' WHERE seq = 2")
    with pytest.raises(BadInput, match="2 customer rows"):
        db.snapshot()


def test_cli_round_trip(pg_url, tmp_path):
    keyfile = tmp_path / "k"
    qk.write_key(keyfile, KEY)
    assert run(["registry", "add", pg_url, "--key", keyfile, "--user", "alice", "--bits", "32"])[0] == 0
    rc, out, _ = run(["registry", "show", pg_url, "--key", keyfile, "--user", "alice", "--json"])
    shown = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and shown["codeword"] == qk.bits_to_hex(qk.Registry(KEY, 32).add("alice"))
