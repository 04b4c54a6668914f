"""``--device auto|cpu|cuda``: auto is the CPU here and writes the CPU's bytes; cuda without a GPU
is one line and exit 2, nothing written."""

from __future__ import annotations

import filecmp

import pytest
import torch

from quantseal.devices import resolve_device, to_device
from quantseal.errors import BadInput, Unsupported
from cli_run import run  # tests/cli_run.py


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BadInput, match="--device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(Unsupported, match="no CUDA device"):
            resolve_device("cuda")


def test_to_device_moves_nested_tensors():
    t = torch.ones(2)
    out = to_device((t, {"a": [t, 3]}, None), torch.device("cpu"))
    assert out[0] is t and out[1]["a"][0] is t and out[1]["a"][1] == 3 and out[2] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("method", ["rtn", "gptq", "cbq"])
def test_cuda_without_gpu_is_one_line_and_nothing_written(tiny_llama_dir, tmp_path, method):
    budget = ["--budget", "4.5"] if method == "rtn" else []
    code, _, err = run(["compress", tiny_llama_dir, "-o", tmp_path / "ck", "--method", method, *budget,
                        "--device", "cuda"])
    assert code == 2 and "cuda" in one_error_line(err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["rtn", "gptq", "cbq"])
def test_cpu_and_auto_write_the_same_bytes(tiny_llama_dir, tmp_path, method):
    args = {"rtn": ["--budget", "4.5", "--workers", "1"], "gptq": ["--calib-samples", "16"],
            "cbq": ["--calib-samples", "16", "--steps", "3", "--abits", "8"]}[method]
    for dev in ("cpu", "auto"):
        code, _, err = run(["compress", tiny_llama_dir, "-o", tmp_path / dev, "--method", method, *args,
                            "--device", dev])
        assert code == 0, err
    if torch.cuda.is_available():
        pytest.skip("auto is cuda here: compared to a tolerance by benchmarks/gpu_check.py")
    for f in sorted(p.name for p in (tmp_path / "cpu").iterdir()):
        assert filecmp.cmp(tmp_path / "cpu" / f, tmp_path / "auto" / f, shallow=False), f
