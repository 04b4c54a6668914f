"""``quantseal serve`` on an exported decoder: ``/generate`` equals the local greedy generation,
``/logits`` equals the local next-token logits (ragged batches, token subsets), malformed
requests get HTTP 400 and the server keeps serving."""

from __future__ import annotations


import numpy as np
import pytest
from http_request import request, served_in_thread  # tests/runtime/http_request.py

from quantseal.errors import BadInput
from quantseal.runtime.client import EndpointCausalLM
from quantseal.runtime.pipelines import CausalLM


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_path(llama_rtn_export):
    return llama_rtn_export[1]["path"]


@pytest.fixture(scope="module")
def served(lm_path):
    from quantseal.runtime.server import GenerationService, make_server, service_for

    service = service_for(lm_path, provider="cpu", max_batch=4)
    assert isinstance(service, GenerationService)
    server = make_server(service, "127.0.0.1", 0)
    with served_in_thread(server) as url:
        yield url


def test_generate_equals_local(served, lm_path):
    local = CausalLM(lm_path, provider="cpu")
    client = EndpointCausalLM(served)
    for prompt in ("The meaning of", "A list is"):
        assert client.generate(prompt, 6) == local.generate(prompt, 6)
    status, body = request(served, "POST", "/generate", b'{"input_ids": [5, 6, 7], "max_new_tokens": 3}')
    assert status == 200 and body["ids"] == local.generate_ids([5, 6, 7], 3)


def test_logits_of_ragged_rows_equal_local(served, lm_path):
    local = CausalLM(lm_path, provider="cpu")
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    got = EndpointCausalLM(served).next_logits(rows)
    for row, g in zip(rows, got):
        ref = local.logits(np.array(row))[-1]  # the row alone, no padding
        np.testing.assert_allclose(g, ref, atol=1e-4, rtol=1e-4)
    sub = EndpointCausalLM(served).next_logits(rows, tokens=[3, 1, 3])
    np.testing.assert_array_equal(sub, got[:, [3, 1, 3]])


@pytest.mark.parametrize("path,body,msg", [
    ("/generate", b'{"prompt": ""}', "non-empty"),
    ("/generate", b'{"prompt": "x", "input_ids": [1]}', "exactly one"),
    ("/generate", b'{"prompt": "x", "max_new_tokens": -1}', "max_new_tokens"),
    ("/logits", b'{"input_ids": [[1, 2], []]}', "non-empty"),
    ("/logits", b'{"input_ids": [[1, 99999999]]}', "must lie in"),
    ("/logits", b'{"input_ids": [[1]], "tokens": [1.5]}', "integers"),
    ("/logits", b'{"input_ids": [[1], [2], [3], [4], [5]]}', "too large"),
    ("/logits", b'not json', "not valid JSON"),
    ("/embed", b'{"texts": ["x"]}', "no such path"),
])
def test_malformed_requests_are_refused_and_serving_continues(served, path, body, msg):
    status, out = request(served, "POST", path, body)
    assert status in (400, 404) and msg in out["error"]
    assert request(served, "GET", "/health", None)[0] == 200


def test_client_reports_refusals_as_bad_input(served):
    with pytest.raises(BadInput, match="refused"):
        EndpointCausalLM(served).next_logits([[1, 10 ** 9]])
