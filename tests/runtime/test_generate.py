"""``CausalLM`` (onnxruntime, no torch) and ``quantseal run --prompt`` on an exported tiny LLaMA."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantseal.cli import main
from quantseal.errors import BadInput
from quantseal.runtime.pipelines import CausalLM


@pytest.fixture(scope="module")
def lm_path(llama_rtn_export):
    return llama_rtn_export[1]["path"]


def test_reads_the_cache_geometry_from_the_file(lm_path):
    lm = CausalLM(lm_path, provider="cpu")
    assert (lm.num_layers, lm.num_kv_heads, lm.head_dim) == (2, 2, 16)
    assert lm.provider == "cpu"
    assert lm.eos_ids == {2}  # LlamaConfig's default eos_token_id, recorded at export


def test_logits_shapes(lm_path):
    lm = CausalLM(lm_path, provider="cpu")
    ids = [101, 7592, 2088]
    one = lm.logits(ids)
    batch = lm.logits(np.array([ids, ids]))
    assert one.shape == (3, 30522) and batch.shape == (2, 3, 30522)
    np.testing.assert_allclose(batch[1], one, rtol=0, atol=1e-5)
    with pytest.raises(BadInput):
        lm.logits(np.zeros((1, 0), dtype=np.int64))


def test_generate_text_is_the_decoded_greedy_ids(lm_path):
    lm = CausalLM(lm_path, provider="cpu")
    prompt = "the quick brown fox"
    ids = lm.generate_ids(lm.encode(prompt), 8)
    assert 1 <= len(ids) <= 8
    assert lm.generate(prompt, 8) == lm.decode(ids)
    assert lm.generate_ids(lm.encode(prompt), 0) == []
    with pytest.raises(BadInput):
        lm.generate("", 5)


def test_stops_at_eos(lm_path):
    lm = CausalLM(lm_path, provider="cpu")
    prompt = lm.encode("a short prompt")
    lm.eos_ids = set()
    free = lm.generate_ids(prompt, 6)
    lm.eos_ids = {free[2]}
    stopped = lm.generate_ids(prompt, 6)
    assert stopped == free[: free.index(free[2]) + 1]


def test_rejects_a_model_that_is_not_a_decoder(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInput):
        CausalLM(tmp_path / "m.onnx", provider="cpu")


def test_cli_run_prompt(lm_path, capsys):
    lm = CausalLM(lm_path, provider="cpu")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["run", lm_path, "--prompt", "hello there", "--max-new-tokens", "5", "--provider", "cpu",
                     "--json"]) == 0
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert res["token_ids"] == lm.generate_ids(lm.encode("hello there"), 5)
    assert res["text"] == lm.generate("hello there", 5)
    assert res["new_tokens"] == len(res["token_ids"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["run", lm_path, "--prompt", "hello there", "--max-new-tokens", "5", "--provider", "cpu"]) == 0
    assert buf.getvalue().strip() == res["text"].strip()


def test_cli_run_bad_inputs(lm_path, capsys):
    assert main(["run", lm_path, "--prompt", "", "--max-new-tokens", "5"]) == 2
    assert main(["run", lm_path, "--prompt", "hi", "--max-new-tokens", "-1"]) == 2
    assert main(["run", lm_path, "--text", "an embedding request to a decoder"]) == 2
