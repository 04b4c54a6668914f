"""An adapter per request on every route of ``quantseal serve`` (issue #13 §5): a switchable export
(``export --adapter A --adapter B --switchable``) answers ``"adapter": NAME`` on ``/embed``,
``/logits`` and ``/generate``, and ``"model": NAME`` on the OpenAI routes as vLLM serves LoRA
adapters (the base's name = no adapter, an unknown name = 404 with OpenAI's error body);
``GET /v1/models`` lists the base and the adapters.  Every answer equals the local pipeline run
with that adapter (itself equal to the folded export of that adapter, test_adapters_switchable.py),
and concurrent requests for different adapters each get their own branch."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from http_request import request, served_in_thread  # tests/runtime/http_request.py

from cli_run import run  # tests/cli_run.py
from peft_adapters import peft_lora  # tests/peft_adapters.py

TEXTS = ["the quick brown fox jumps over the lazy dog", "a second, longer sentence with some words in it"]
IDS = [[1, 7592, 2088, 2003, 102, 55], [1, 999, 3231, 12]]


@contextlib.contextmanager
def serving(path, adapter=None, token=None):
    from quantseal.runtime.server import Limits, make_server, service_for

    service = service_for(path, provider="cpu", max_batch=8, adapter=adapter)
    with served_in_thread(make_server(service, "127.0.0.1", 0, token=token, limits=Limits(workers=4))) as url:
        yield url


def post(url, path, obj):
    return request(url, "POST", path, json.dumps(obj).encode())


def _switchable(ck, base_dir, root, targets_a, targets_b):
    a = peft_lora(base_dir, root / "a", 1, r=4, lora_alpha=8, target_modules=targets_a)
    b = peft_lora(base_dir, root / "b", 2, r=4, lora_alpha=8, target_modules=targets_b)
    sw = root / "sw" / "model.onnx"
    rc, _, err = run(["export", ck, "-o", sw, "--adapter", f"alpha={a}", "--adapter", f"beta={b}", "--switchable",
                      "--accuracy-level", "0"])
    assert rc == 0, err
    return sw


@pytest.fixture(scope="module")
def decoder(llama_rtn_export, tiny_llama_sharp_dir, tmp_path_factory):
    return _switchable(llama_rtn_export[0], tiny_llama_sharp_dir, tmp_path_factory.mktemp("sw_dec"),
                       ["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"])


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sw_enc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(["compress", tiny_bert_dir, "-o", root / "ck", "--method", "rtn", "--budget", "4.5",
                    "--workers", "1"])[0] == 0
        return _switchable(root / "ck", tiny_bert_dir, root, ["query", "value"], ["key", "dense"])
    finally:
        torch.set_num_threads(threads)


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def test_decoder_routes_take_the_adapter(decoder):
    from quantseal.runtime.pipelines import CausalLM

    lm = CausalLM(decoder, provider="cpu")
    want = {name: lm.next_logits(IDS, adapter=name) for name in (0, "alpha", "beta")}
    scale = max(np.abs(w).max() for w in want.values())
    for name in ("alpha", "beta"):
        assert np.abs(want[name] - want[0]).max() > 1e-2 * scale  # each adapter changes the logits
    prompt = "the quick brown fox"
    with serving(decoder, adapter="beta") as url:  # serve --adapter beta: the default
        status, models = request(url, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["model", "alpha", "beta"]
        assert [m.get("parent") for m in models["data"]] == [None, "model", "model"]
        for asked, ref in ((None, "beta"), ("alpha", "alpha"), ("beta", "beta")):
            body = {"input_ids": IDS, **({"adapter": asked} if asked else {})}
            status, got = post(url, "/logits", body)
            assert status == 200
            assert np.abs(np.array(got["logits"]) - want[ref]).max() <= 1e-5 * scale, asked
        status, got = post(url, "/generate", {"prompt": prompt, "max_new_tokens": 5, "adapter": "alpha"})
        assert status == 200 and got["text"] == lm.generate(prompt, 5, adapter="alpha")

        ids = lm.tokenizer.encode(prompt, add_special_tokens=False).ids
        for model, ref in (("alpha", "alpha"), ("model", 0), (None, "beta")):
            body = {"prompt": prompt, "max_tokens": 4, "logprobs": 3, **({"model": model} if model else {})}
            status, got = post(url, "/v1/completions", body)
            assert status == 200, got
            seq, lps = list(ids), []
            for _ in range(4):  # the reference: greedy on the full sequence, no cache
                z = lm.logits(np.array([seq]), adapter=ref)[0, -1]
                seq.append(int(np.argmax(z)))
                lps.append(_log_softmax(z)[seq[-1]])
            assert lm.decode(seq[len(ids):]) == got["choices"][0]["text"], model
            np.testing.assert_allclose(got["choices"][0]["logprobs"]["token_logprobs"], lps, atol=1e-4)
            chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "logprobs": True,
                    **({"model": model} if model else {})}
            status, got = post(url, "/v1/chat/completions", chat)
            assert status == 200 and got["choices"][0]["message"]["content"] == lm.decode(seq[len(ids):]), model
            np.testing.assert_allclose([c["logprob"] for c in got["choices"][0]["logprobs"]["content"]], lps,
                                       atol=1e-4)

        for path, body in (("/v1/completions", {"prompt": prompt, "model": "gamma"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gamma"})):
            status, got = post(url, path, body)
            assert status == 404 and got["error"]["code"] == "model_not_found" and got["error"]["param"] == "model"
            assert "'gamma'" in got["error"]["message"] and got["error"]["type"] == "invalid_request_error"
        status, got = post(url, "/logits", {"input_ids": IDS, "adapter": "gamma"})
        assert status == 404 and "no adapter named 'gamma' (it has alpha, beta)" in got["error"]
        assert request(url, "POST", "/v1/models", b"{}")[0] == 405


def test_concurrent_requests_get_their_own_adapter(decoder, encoder):
    """24 requests from 8 threads, adapters interleaved, into one server with 4 workers: each
    answer is its own adapter's (bit-identical to the request run alone)."""
    from quantseal.runtime.pipelines import CausalLM, Embedder

    lm = CausalLM(decoder, provider="cpu")
    logits = {n: lm.next_logits(IDS, adapter=n) for n in (0, "alpha", "beta")}
    with serving(decoder) as url:
        def ask(i):
            name = (None, "alpha", "beta")[i % 3]
            status, got = post(url, "/logits", {"input_ids": IDS, **({"adapter": name} if name else {})})
            assert status == 200
            return name or 0, np.array(got["logits"], dtype=np.float32)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(24)))
    for name, got in answers:
        np.testing.assert_allclose(got, logits[name], rtol=0, atol=1e-6)

    emb = Embedder(encoder, provider="cpu")
    vectors = {n: emb.embed(TEXTS, adapter=n) for n in (0, "alpha", "beta")}
    assert min(1 - np.sum(vectors[0] * vectors[n], 1).min() for n in ("alpha", "beta")) > 1e-4
    with serving(encoder) as url:
        def embed(i):
            model = ("model", "alpha", "beta")[i % 3]
            if i % 2:
                status, got = post(url, "/v1/embeddings", {"model": model, "input": TEXTS})
                got = [d["embedding"] for d in got["data"]]
            else:
                status, got = post(url, "/embed", {"texts": TEXTS, **({} if model == "model" else {"adapter": model})})
                got = got["embeddings"]
            assert status == 200
            return 0 if model == "model" else model, np.array(got, dtype=np.float32)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(embed, range(24)))
        status, got = post(url, "/v1/embeddings", {"model": "gamma", "input": TEXTS})
        assert status == 404 and got["error"]["code"] == "model_not_found"
        status, models = request(url, "GET", "/v1/models")
        assert [m["id"] for m in models["data"]] == ["model", "alpha", "beta"]
    for name, got in answers:
        np.testing.assert_allclose(got, vectors[name], rtol=0, atol=1e-6)


def test_a_file_without_adapters_is_one_model(llama_rtn_export):
    """No adapters: ``model`` is echoed, not checked (one model); an ``adapter`` is a 404.
    ``GET /v1/models`` is behind the bearer token like every route but /health."""
    with serving(llama_rtn_export[1]["path"], token="s3cret") as url:
        assert request(url, "GET", "/v1/models")[0] == 401
        status, models = request(url, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and [m["id"] for m in models["data"]] == ["model"]
    with serving(llama_rtn_export[1]["path"]) as url:
        status, got = post(url, "/v1/completions", {"prompt": "the quick", "max_tokens": 1, "model": "anything"})
        assert status == 200 and got["model"] == "anything"
        status, got = post(url, "/logits", {"input_ids": IDS, "adapter": "alpha"})
        assert status == 404 and "has no switchable adapters" in got["error"]
