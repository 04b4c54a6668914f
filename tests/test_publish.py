"""Atomic publishing of output folders, orphan collection and output-path validation
(quantseal/publish.py), and the CLI's early refusal of bad output paths."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantseal import publish
from quantseal.errors import BadInput

from cli_run import run  # tests/cli_run.py


def _write(folder: Path, version: str) -> Path:
    (folder / "marker.json").write_text(version)
    (folder / "data.bin").write_bytes(version.encode() * 1000)
    return folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_exchange_replaces_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    assert publish.publish_folder(_write(publish.temp_folder(out), "v1"), out) == "rename"
    assert publish.publish_folder(_write(publish.temp_folder(out), "v2"), out) == "exchange"
    assert (out / "marker.json").read_text() == "v2" and (out / "data.bin").read_bytes() == b"v2" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_symlink_flip_keeps_one_version(tmp_path):
    out = tmp_path / "ck"
    for v in ("v1", "v2", "v3"):
        assert publish.publish_folder(_write(publish.temp_folder(out), v), out, use_exchange=False) == "symlink"
        assert (out / "marker.json").read_text() == v
    assert out.is_symlink()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[1] == "ck" and names[0] == os.readlink(out)  # only the live version
    # a symlinked output keeps being published by link flips, even with RENAME_EXCHANGE available
    assert publish.publish_folder(_write(publish.temp_folder(out), "v4"), out) == "symlink"
    assert (out / "marker.json").read_text() == "v4" and len(list(tmp_path.iterdir())) == 2


def test_two_rename_fallback_and_restore(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    publish.publish_folder(_write(publish.temp_folder(out), "v1"), out)
    monkeypatch.setattr(publish, "exchange", lambda a, b: False)
    assert publish.publish_folder(_write(publish.temp_folder(out), "v2"), out) == "two-renames"
    assert (out / "marker.json").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["ck"]
    # a kill between the two renames leaves the old folder set aside: the next run moves it back
    pid = _dead_pid()
    os.rename(out, tmp_path / f".ck.quantseal-old-{pid}-abc")
    assert publish.collect_orphans(tmp_path) == [f"restored {out} from .ck.quantseal-old-{pid}-abc"]
    assert (out / "marker.json").read_text() == "v2"


def test_orphans_of_dead_writers_collected(tmp_path):
    out = tmp_path / "ck"
    publish.publish_folder(_write(publish.temp_folder(out), "v1"), out)
    dead = _dead_pid()
    orphan = tmp_path / f".ck.quantseal-tmp-{dead}-x1"
    orphan.mkdir()
    _write(orphan, "half")
    stale_link = tmp_path / f".ck.quantseal-tmp-{dead}-x2.link"
    stale_link.symlink_to("nowhere")
    live = tmp_path / f".ck.quantseal-tmp-{os.getpid()}-x3"  # a running writer's: kept
    live.mkdir()
    other = tmp_path / f".other.quantseal-tmp-{dead}-x4"
    other.mkdir()
    keep = tmp_path / ".ck.notours"
    keep.mkdir()
    # the next publish of ck cleans ck's orphans only
    publish.publish_folder(_write(publish.temp_folder(out), "v2"), out)
    assert not orphan.exists() and not stale_link.is_symlink() and live.exists() and other.exists() and keep.exists()
    rc, out_text, err = run(["gc", tmp_path])
    assert rc == 0 and "removed" in out_text and not other.exists() and live.exists() and keep.exists()
    assert (out / "marker.json").read_text() == "v2"


@pytest.mark.parametrize("case", ["proc", "under_file", "is_file", "foreign_folder", "dot"])
def test_check_output_folder(tmp_path, case):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    target = {"proc": Path("/proc/self/ck"), "under_file": tmp_path / "f" / "ck", "is_file": tmp_path / "f",
              "foreign_folder": tmp_path / "d", "dot": Path(".")}[case]
    with pytest.raises(BadInput):
        publish.check_output_folder(target, "quantseal.json", "checkpoint")
    assert (tmp_path / "f").read_text() == "x" and (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_check_output_folder_accepts(tmp_path):
    assert publish.check_output_folder(tmp_path / "a" / "b" / "ck", "quantseal.json", "checkpoint")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "quantseal.json").write_text("{}")
    assert publish.check_output_folder(tmp_path / "ck", "quantseal.json", "checkpoint")


@pytest.mark.parametrize("command", ["compress", "board"])
@pytest.mark.parametrize("where", ["proc", "under_file", "foreign_folder"])
def test_cli_refuses_bad_output_before_compute(tmp_path, command, where):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    out = {"proc": "/proc/self/ck", "under_file": tmp_path / "f" / "ck", "foreign_folder": tmp_path / "d"}[where]
    missing = tmp_path / "no-such-checkpoint"  # compute would fail on it: the output check must come first
    argv = (["compress", missing, "-o", out, "--budget", "4", "--method", "rtn"] if command == "compress"
            else ["board", "train", missing, "-o", out, "--key", tmp_path / "no.key"])
    t0 = time.perf_counter()
    rc, _, err = run(argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(out) in err, err
    assert time.perf_counter() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"] and list((tmp_path / "d").iterdir()) == []


_CHILD = textwrap.dedent("""
    import sys, torch
    from quantseal.checkpoint import Manifest, write_checkpoint
    out, src, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(start, start + 10**6):
        m = Manifest({"model_type": "bert"}, "rtn", {"version": i}, {})
        write_checkpoint(out, m, {"w": torch.full((256, 1024), float(i))}, src)
        print(i, flush=True)
""")


def _version(out: Path):
    """The complete checkpoint's version at ``out`` (read_checkpoint checks the whole folder)."""
    from quantseal.checkpoint import read_checkpoint

    manifest, tensors = read_checkpoint(out)
    v = manifest.budget["version"]
    assert float(tensors["w"][0, 0]) == v and bool((tensors["w"] == v).all())
    return v


@pytest.mark.slow
def test_kill_nine_never_leaves_the_path_empty(tmp_path, tiny_bert_dir):
    """kill -9 at random moments of a process publishing checkpoints over the same path in a loop:
    every time the path holds a complete checkpoint (the version it had, or a newer one)."""
    out = tmp_path / "ck"
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    rng = random.Random(0)
    seen_new = 0
    for k in range(6):
        before = _version(out) if out.exists() else None
        start = (k + 1) * 10**6
        p = subprocess.Popen([sys.executable, str(child), str(out), str(tiny_bert_dir), str(start)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline()  # torch imported, one checkpoint published
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        v = _version(out)  # never absent, never half-written
        assert v == before or v >= start
        seen_new += v >= start
    assert seen_new >= 1
    run(["gc", out])
    assert [p.name for p in tmp_path.iterdir() if p.name != "child.py"] == ["ck"]
