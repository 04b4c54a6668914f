"""An export's files published as one unit (quantseal/export/publish_export.py): a folder of its
own is swapped in whole, so after a kill -9 at any moment it holds one complete export (a
model.onnx never meets another export's model.onnx.data); a shared folder keeps its other files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantseal.errors import BadInput
from quantseal.export.onnx import export_onnx
from quantseal.export.publish_export import owns_folder

from cli_run import run  # tests/cli_run.py


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_which_folders_an_export_may_replace_whole(tmp_path, monkeypatch):
    out = tmp_path / "exp" / "model.onnx"
    assert owns_folder(out)  # new
    out.parent.mkdir()
    assert owns_folder(out)  # empty
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        (out.parent / name).write_text("x")
    assert owns_folder(out)  # what an export writes
    (out.parent / "notes.txt").write_text("mine")
    assert not owns_folder(out)  # a file of someone else's
    (out.parent / "notes.txt").unlink()
    (out.parent / "ck").mkdir()
    assert not owns_folder(out)  # a folder (a checkpoint beside its export)
    (out.parent / "ck").rmdir()
    assert not owns_folder(out.parent / "other.onnx")  # model.onnx is another export's
    link = tmp_path / "link"
    link.symlink_to(out.parent)
    assert not owns_folder(link / "model.onnx")  # a link the user made: its target is left alone
    monkeypatch.chdir(out.parent)
    assert not owns_folder(Path("model.onnx"))  # the working directory


def test_folder_of_its_own_is_replaced_whole(llama_rtn_export, tmp_path):
    """An external-data export, then a one-file export into the same folder: the old
    model.onnx.data goes with the old folder; nothing is left beside it."""
    ck, _ = llama_rtn_export
    out = tmp_path / "exp" / "model.onnx"
    export_onnx(ck, out, external_data="always")
    assert (out.parent / "model.onnx.data").is_file()
    ino = out.parent.stat().st_ino
    export_onnx(ck, out)
    assert sorted(_files(out.parent)) == ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert out.parent.stat().st_ino != ino  # swapped in, not written into
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_shared_folder_keeps_other_files_and_refuses_an_unswappable_pair(llama_rtn_export, tmp_path):
    ck, _ = llama_rtn_export
    out = tmp_path / "model.onnx"
    (tmp_path / "notes.txt").write_text("mine")
    export_onnx(ck, out, external_data="always")  # no data file yet: data renamed in first, the model last
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "model.onnx.data").is_file()
    before = _files(tmp_path)
    with pytest.raises(BadInput, match="folder of its own"):
        export_onnx(ck, out, external_data="always")
    assert _files(tmp_path) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    export_onnx(ck, out)  # one file: the model replaces the old one, then the old data is removed
    assert "model.onnx.data" not in _files(tmp_path) and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(BadInput, match="--external-data must be one of auto, always, never"):
        export_onnx(ck, out, external_data="sometimes")


_CHILD = textwrap.dedent("""
    import sys
    from quantseal.export.onnx import export_onnx
    out, i, cks = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    while True:
        export_onnx(cks[i % 2], out, external_data="always")
        print(i, flush=True)
        i += 1
""")


@pytest.mark.slow
def test_kill_nine_leaves_one_complete_export(llama_rtn_export, llama_lq_export, tmp_path):
    """kill -9 at random moments of a process exporting two checkpoints in turn, with external
    data, over the same path: the folder always holds exactly one of the two complete exports."""
    cks = [llama_rtn_export[0], llama_lq_export[0]]
    refs = []
    for i, ck in enumerate(cks):
        export_onnx(ck, tmp_path / f"ref{i}" / "model.onnx", external_data="always")
        refs.append(_files(tmp_path / f"ref{i}"))
    assert refs[0]["model.onnx.data"] != refs[1]["model.onnx.data"]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "exp" / "model.onnx"
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    rng = random.Random(0)
    for k in range(6):  # child k starts with checkpoint k % 2, then alternates; each exports over the last
        p = subprocess.Popen([sys.executable, str(child), str(out), str(k), *map(str, cks)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline()  # imported, one export published
        time.sleep(rng.uniform(0.0, 1.0))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        # never absent, never half-written, never one export's model.onnx with the other's model.onnx.data
        assert _files(out.parent) in refs
    assert run(["gc", out.parent])[0] == 0
    assert [p.name for p in work.iterdir()] == ["exp"] and not [p for p in out.parent.iterdir() if p.name[0] == "."]
