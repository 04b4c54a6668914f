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
