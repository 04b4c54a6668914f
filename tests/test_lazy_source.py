"""lazy_source.fix_mmap_threshold: freed 1 MB+ tensors go back to the system (a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantseal.lazy_source import _libc

_CHILD = """
import json, sys, torch
from quantseal.lazy_source import fix_mmap_threshold
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) * 1024
fixed = fix_mmap_threshold() if sys.argv[1] == 'fixed' else None
keep = []
for _ in range(2):  # the second round is where glibc's raised threshold puts 4 MB blocks on the heap
    before = rss()
    big = []
    for i in range(40):
        big.append(torch.ones(1 << 20))  # 4 MB each, written
        keep.append(torch.ones(64 * 1024))  # 256 kB, long-lived, interleaved
    del big
after = rss()
print(json.dumps({'fixed': fixed, 'grew': after - before, 'kept': 40 * 256 * 1024}))
"""


def _grew(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_freed_large_tensors_return_to_the_system_with_a_fixed_threshold():
    res = _grew("fixed")
    assert res["fixed"] is True
    # 160 MB of 4 MB tensors allocated and freed around 10 MB of small ones that stay: only those remain
    assert res["grew"] < res["kept"] + 8 * 2**20, res


def test_gather_rows_reads_only_chunks_of_rows_in_use(tiny_llama_dir, monkeypatch):
    """``gather_rows`` equals the whole table indexed by the rows (bit for bit), for chunks of
    one row up to the whole table, and reads only spans that start at a row in use."""
    import torch

    from quantseal.lazy_source import LazySource
    from quantseal.tensorfile import SafetensorsReader

    src = LazySource(tiny_llama_dir)
    key = "model.embed_tokens.weight"
    full = src.get(key)
    vocab, width = full.shape
    rows = torch.unique(torch.tensor([0, 1, 2, 17, 4000, 4001, 12345, vocab - 1]))
    read = []
    orig = SafetensorsReader.get_rows
    monkeypatch.setattr(SafetensorsReader, "get_rows",
                        lambda self, name, a, b: read.append((a, b)) or orig(self, name, a, b))
    for chunk_bytes in (1, 4 * width * 16, 4 * width * 8192, 1 << 30):
        read.clear()
        got = src.gather_rows(key, rows, chunk_bytes=chunk_bytes)
        assert got.dtype == torch.float32 and torch.equal(got, full[rows]), chunk_bytes
        assert {a for a, _ in read} <= set(rows.tolist())  # every span starts at a row in use
        if chunk_bytes == 1:
            assert sum(b - a for a, b in read) == len(rows)  # one row per read
        if chunk_bytes <= 4 * width * 8192:
            assert sum(b - a for a, b in read) < vocab // 2  # not the table
    assert src.gather_rows(key, rows[:0]).shape == (0, width)
