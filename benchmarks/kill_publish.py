"""kill -9 at random moments of a process publishing a checkpoint or a board over an existing one (issue 11).

Three kinds of child process, each killed with SIGKILL at a uniformly random moment:

* ``loop``: a Python loop calling :func:`quantseal.checkpoint.write_checkpoint` over the same path
  (MiniLM-sized tensors, 94 MB per checkpoint), each version tagged in its manifest; the clock
  starts when its first version is published (``old`` = that version, ``new`` = a later one), so
  the kill lands anywhere in write / fsync / publish / delete-the-old;
* ``cli``: the real ``quantseal compress --method rtn`` on the bundled all-MiniLM-L6-v2 over an
  existing checkpoint made with another budget (so old and new are told apart by the manifest),
  killed at a random moment of its measured run time;
* ``board``: the real ``quantseal board train`` on a tiny seeded BERT (2 layers, hidden 64,
  compressed by ``quantseal compress --method rtn``) over an existing board trained with another
  seed (old and new told apart by the manifest's training seed), killed at a random moment of
  its measured run time (load, training, saving, publishing).  Most of that run is training, so
  ``--board`` also runs a ``board loop``: a child re-saving that board over its path with
  :func:`~quantseal.compress.markboard.save_board` (each version's training seed its counter),
  killed after a uniformly random 0-2 s: the kill lands in write / fsync / publish
  (``--board-loop N``, default as many as ``--board``).

After each kill the path is classified: ``absent``, ``invalid`` (``read_checkpoint`` or
``load_board`` refuses it: missing files, a wrong sha256, a lying manifest, NaN), ``old_kept`` or
``new_complete``.  Orphaned temporary folders are counted, then ``quantseal gc`` runs and what is
left is counted again.

    python benchmarks/kill_publish.py                       # 40 loop + 10 cli kills
    python benchmarks/kill_publish.py --loop 50 --cli 0     # publish path only (a minute)
    python benchmarks/kill_publish.py --loop 0 --cli 0 --board 50 --out benchmarks/results/kill_publish_board.json
                                                            # 50 board train + 50 board loop kills

Writes ``benchmarks/results/kill_publish.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CHILD = textwrap.dedent("""
    import sys, torch
    from quantseal.checkpoint import Manifest, write_checkpoint
    out, src, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    g = torch.Generator().manual_seed(start)
    tensors = {f"layer{j}.w": torch.randn(384, 1536, generator=g) for j in range(40)}
    for i in range(start, start + 10**6):
        tensors["version"] = torch.full((4,), float(i))
        write_checkpoint(out, Manifest({"model_type": "bert"}, "rtn", {"version": i}, {}), tensors, src)
        print(i, flush=True)
""")


def classify(out: Path, before, is_new) -> str:
    from quantseal.checkpoint import read_checkpoint
    from quantseal.errors import BadInput

    if not out.exists():
        return "absent"
    try:
        manifest, _ = read_checkpoint(out)
    except BadInput:
        return "invalid"
    tag = manifest.budget.get("version", manifest.budget.get("asked"))
    if is_new(tag):
        return "new_complete"
    return "old_kept" if tag == before else "invalid"


def orphans(folder: Path, name: str) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith(f".{name}."))


def gc(out: Path) -> int:
    r = subprocess.run([sys.executable, "-m", "quantseal", "gc", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return orphans(out.parent, out.name)


def loop_kills(n: int, work: Path, src: Path, rng: random.Random) -> dict:
    out = work / "loop-ck"
    child = work / "child.py"
    child.write_text(CHILD)
    counts = {"absent": 0, "invalid": 0, "old_kept": 0, "new_complete": 0}
    left, max_left, delays = 0, 0, []
    for k in range(n):
        start = (k + 1) * 10**6
        p = subprocess.Popen([sys.executable, str(child), str(out), str(src), str(start)],
                             stdout=subprocess.PIPE, text=True)
        before = int(p.stdout.readline())  # torch imported, its first version published: the clock starts
        delay = rng.uniform(0.0, 2.0)  # a version takes ~0.3-1 s here: kills land anywhere in the loop
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        delays.append(delay)
        c = classify(out, before, lambda v, b=before: isinstance(v, int) and v > b)
        counts[c] += 1
        left = orphans(work, out.name)
        max_left = max(max_left, left)
        print(f"loop kill {k + 1}/{n} after {delay:.2f}s: {c}, {left} orphan(s) beside it", flush=True)
    return {**counts, "kills": n, "orphans_after_last_kill": left, "max_orphans_seen": max_left,
            "orphans_after_gc": gc(out), "kill_delay_s": [min(delays), max(delays)] if delays else None}


def cli_kills(n: int, work: Path, rng: random.Random) -> dict:
    out = work / "cli-ck"
    base = [sys.executable, "-m", "quantseal", "compress", "-o", str(out), "--method", "rtn", "--workers", "1"]
    t0 = time.perf_counter()
    subprocess.run(base + ["--budget", "4.5"], check=True, capture_output=True)
    full = time.perf_counter() - t0
    counts = {"absent": 0, "invalid": 0, "old_kept": 0, "new_complete": 0}
    budgets = (4.5, 5.0)
    for k in range(n):
        from quantseal.checkpoint import read_checkpoint

        before = read_checkpoint(out)[0].budget["asked"]
        new = budgets[1] if before == budgets[0] else budgets[0]
        delay = rng.uniform(0.0, full * 1.1)
        p = subprocess.Popen(base + ["--budget", str(new)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        c = classify(out, before, lambda v, s=new: v == s)
        counts[c] += 1
        print(f"cli kill {k + 1}/{n} after {delay:.2f}s of ~{full:.1f}s: {c}", flush=True)
    return {**counts, "kills": n, "full_run_seconds": round(full, 2), "orphans_before_gc": orphans(work, out.name),
            "orphans_after_gc": gc(out)}


def tiny_checkpoint(work: Path) -> Path:
    """A seeded 2-layer BERT (hidden 64) with MiniLM's tokenizer, compressed by the real CLI."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from quantseal.models import default_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    src = work / "tiny-bert"
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(src, safe_serialization=True)
    shutil.copyfile(default_model_path() / "tokenizer.json", src / "tokenizer.json")
    ck = work / "tiny-ck"
    subprocess.run([sys.executable, "-m", "quantseal", "compress", str(src), "-o", str(ck), "--budget", "4.5",
                    "--method", "rtn", "--workers", "1"], check=True, capture_output=True)
    return ck


def classify_board(out: Path, before: int, new: int) -> str:
    from quantseal.compress.markboard import load_board
    from quantseal.errors import BadInput

    if not out.exists():
        return "absent"
    try:
        seed = load_board(out).manifest["training"]["seed"]
    except (BadInput, KeyError, TypeError):
        return "invalid"
    return "new_complete" if seed == new else ("old_kept" if seed == before else "invalid")


def board_kills(n: int, work: Path, rng: random.Random) -> dict:
    """``quantseal board train`` over an existing board, killed at random moments."""
    from quantseal.keys import write_key

    ck = tiny_checkpoint(work)
    key = work / "board.key"
    write_key(key, bytes(range(32)))
    out = work / "board"
    base = [sys.executable, "-m", "quantseal", "board", "train", str(ck), "-o", str(out), "--key", str(key),
            "--bits", "16", "--steps", "5", "--triggers-per-bit", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(base + ["--seed", "0"], check=True, capture_output=True, env=env)
    full = time.perf_counter() - t0
    counts = {"absent": 0, "invalid": 0, "old_kept": 0, "new_complete": 0}
    left, max_left = 0, 0
    for k in range(n):
        before = int(classify_seed(out))
        new = 1 - before
        delay = rng.uniform(0.0, full * 1.1)
        p = subprocess.Popen(base + ["--seed", str(new)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        c = classify_board(out, before, new)
        counts[c] += 1
        left = orphans(work, out.name)
        max_left = max(max_left, left)
        print(f"board kill {k + 1}/{n} after {delay:.2f}s of ~{full:.1f}s: {c}, {left} orphan(s) beside it", flush=True)
        if c in ("absent", "invalid"):  # start the next round from a complete board again
            subprocess.run(base + ["--seed", "0"], check=True, capture_output=True, env=env)
    return {**counts, "kills": n, "full_run_seconds": round(full, 2), "orphans_after_last_kill": left,
            "max_orphans_seen": max_left, "orphans_after_gc": gc(out)}


BOARD_CHILD = textwrap.dedent("""
    import sys
    from quantseal.compress.markboard import load_board, save_board
    out, ck, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    board = load_board(out)
    for i in range(start, start + 10**6):
        board.manifest["training"]["seed"] = i
        save_board(board, out, ck)
        print(i, flush=True)
""")


def board_loop_kills(n: int, work: Path, rng: random.Random) -> dict:
    """A ``save_board`` loop over an existing board (trained by :func:`board_kills`), killed at
    random moments: the kills land in writing, fsync and publishing."""
    out, ck = work / "board", work / "tiny-ck"
    child = work / "board_child.py"
    child.write_text(BOARD_CHILD)
    counts = {"absent": 0, "invalid": 0, "old_kept": 0, "new_complete": 0}
    left, max_left = 0, 0
    for k in range(n):
        start = (k + 1) * 10**6
        p = subprocess.Popen([sys.executable, str(child), str(out), str(ck), str(start)], stdout=subprocess.PIPE,
                             text=True)
        before = int(p.stdout.readline())  # its first version is published: the clock starts
        delay = rng.uniform(0.0, 2.0)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        try:
            seed = classify_seed(out)
        except Exception:
            seed = None
        c = classify_board(out, before, seed if isinstance(seed, int) and seed > before else -1)
        counts[c] += 1
        left = orphans(work, out.name)
        max_left = max(max_left, left)
        print(f"board loop kill {k + 1}/{n} after {delay:.2f}s: {c}, {left} orphan(s) beside it", flush=True)
    return {**counts, "kills": n, "orphans_after_last_kill": left, "max_orphans_seen": max_left,
            "orphans_after_gc": gc(out)}


def classify_seed(out: Path) -> int:
    from quantseal.compress.markboard import load_board

    return load_board(out).manifest["training"]["seed"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", type=int, default=40)
    ap.add_argument("--cli", type=int, default=10)
    ap.add_argument("--board", type=int, default=0, help="kills of `quantseal board train` on a tiny model")
    ap.add_argument("--board-loop", type=int, default=None, help="kills of a save_board loop (default: --board)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kill_publish.json")
    args = ap.parse_args()
    from quantseal.models import default_model_path
    from quantseal.publish import exchange

    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kill_publish.") as tmp:
        work = Path(tmp)
        probe_a, probe_b = work / "a", work / "b"
        probe_a.mkdir(), probe_b.mkdir()
        res = {"benchmark": "kill_publish", "seed": args.seed, "platform": platform.platform(),
               "python": platform.python_version(), "rename_exchange": exchange(probe_a, probe_b)}
        probe_a.rmdir(), probe_b.rmdir()
        res["loop"] = loop_kills(args.loop, work, default_model_path(), rng) if args.loop else None
        res["cli"] = cli_kills(args.cli, work, rng) if args.cli else None
        res["board"] = board_kills(args.board, work, rng) if args.board else None
        n_loop = args.board if args.board_loop is None else args.board_loop
        if n_loop and not args.board:
            raise SystemExit("--board-loop re-saves the board --board trains: give --board too")
        res["board_loop"] = board_loop_kills(n_loop, work, rng) if n_loop else None
    parts = [r for r in (res["loop"], res["cli"], res["board"], res["board_loop"]) if r]
    res["total"] = {k: sum(r[k] for r in parts) for k in ("kills", "absent", "invalid", "old_kept", "new_complete")}
    res["never_absent_or_invalid"] = res["total"]["absent"] == 0 and res["total"]["invalid"] == 0
    res["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res["total"]), "never absent or invalid:", res["never_absent_or_invalid"])


if __name__ == "__main__":
    main()
