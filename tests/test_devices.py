"""``--device auto|cpu|cuda``: auto is the CPU here and writes the CPU's bytes; cuda without a GPU
is one line and exit 2, nothing written."""

from __future__ import annotations

import filecmp
import json

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_board_train_cuda_without_gpu_is_one_line_and_nothing_written(minilm_rtn_checkpoint, tmp_path):
    code, _, _ = run(["keygen", "-o", tmp_path / "key"])
    assert code == 0
    code, _, err = run(["board", "train", minilm_rtn_checkpoint, "-o", tmp_path / "board", "--key", tmp_path / "key",
                        "--bits", "16", "--steps", "2", "--device", "cuda"])
    assert code == 2 and "cuda" in one_error_line(err)
    assert not (tmp_path / "board").exists()


def test_board_train_auto_gives_the_cpu_board(minilm_rtn_checkpoint, watermark_key):
    """``train_board(device="auto")`` against ``device="cpu"`` (same settings, key and seed; a short
    board): without a GPU auto is the CPU, so the same tensors bit for bit and the same manifest
    fields but for their seconds."""
    from quantseal.compress.markboard import BoardConfig, train_board

    if torch.cuda.is_available():
        pytest.skip("auto is cuda here: compared to a tolerance by benchmarks/gpu_check.py")
    cfg = BoardConfig(bits=8, triggers_per_bit=2, steps=6, seed=0)
    board = train_board(minilm_rtn_checkpoint, watermark_key, cfg, device="auto")
    ref = train_board(minilm_rtn_checkpoint, watermark_key, cfg, device="cpu")
    assert set(board.tensors) == set(ref.tensors) and board.tensors
    for name, t in ref.tensors.items():
        assert torch.equal(board.tensors[name], t), name
    assert any(t.abs().sum() > 0 for t in ref.tensors.values())  # six steps moved the board
    got, want = json.loads(json.dumps(board.manifest, default=str)), json.loads(json.dumps(ref.manifest, default=str))
    got["training"].pop("seconds"), want["training"].pop("seconds")
    assert got == want