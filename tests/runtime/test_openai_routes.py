"""``quantseal serve``'s OpenAI-compatible routes: ``/v1/embeddings`` equals the local Embedder;
``/v1/completions`` and ``/v1/chat/completions`` give the greedy token and log-probabilities equal
to a float64 log-softmax of the local logits; malformed requests are 400; verify reads a marked
decoder through them (the whole loop without a network)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from http_request import request, served_in_thread  # tests/runtime/http_request.py

from quantseal import keys as qk
from quantseal.runtime.openai_routes import token_text
from quantseal.runtime.pipelines import CausalLM, Embedder

from cli_run import run  # tests/cli_run.py

pytestmark = pytest.mark.slow
KEY = bytes(range(32))


@contextlib.contextmanager
def serving(path, max_batch=8, chat_template="auto", **kw):
    from quantseal.runtime.server import make_server, service_for

    server = make_server(service_for(path, provider="cpu", max_batch=max_batch, chat_template=chat_template),
                         "127.0.0.1", 0, **kw)
    with served_in_thread(server) as url:
        yield url


def post(url, path, obj):
    return request(url, "POST", path, json.dumps(obj).encode())


def test_v1_embeddings_equal_local(minilm_rtn_onnx):
    local = Embedder(minilm_rtn_onnx, provider="cpu")
    texts = ["One sentence.", "Another, longer sentence than the first."]
    with serving(minilm_rtn_onnx) as url:
        status, body = post(url, "/v1/embeddings", {"model": "m", "input": texts})
        assert status == 200 and body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, local.embed(texts), atol=1e-6)
        status, one = post(url, "/v1/embeddings", {"input": texts[1]})
        np.testing.assert_allclose(one["data"][0]["embedding"], got[1], atol=1e-6)
        ids = local.tokenizer.encode_ids(texts[0])
        status, by_ids = post(url, "/v1/embeddings", {"input": [ids]})
        np.testing.assert_allclose(by_ids["data"][0]["embedding"], got[0], atol=1e-6)
        assert by_ids["usage"]["prompt_tokens"] == len(ids)
        for bad in ({"input": []}, {"input": 3}, {"input": ["a"], "encoding_format": "base64"},
                    {"input": ["a"], "n": 2}, {"input": ["x" * 100_001]}, {"input": [[1, 10 ** 40]]}):
            status, err = post(url, "/v1/embeddings", bad)
            assert status == 400 and err["status"] == 400, (bad, err)


@pytest.fixture(scope="module")
def lm_path(llama_rtn_export):
    return llama_rtn_export[1]["path"]


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_completions_and_chat_logprobs_equal_local(lm_path):
    local = CausalLM(lm_path, provider="cpu")
    prompts = ["the meaning of a list is", "numbers and strings"]
    with serving(lm_path) as url:
        status, body = post(url, "/v1/completions", {"prompt": prompts, "max_tokens": 3, "logprobs": 5,
                                                     "temperature": 0})
        assert status == 200 and len(body["choices"]) == 2
        for p, choice in zip(prompts, body["choices"]):
            ids = local.tokenizer.encode(p, add_special_tokens=False).ids
            new = local.generate_ids(ids, 3)
            assert choice["text"] == local.decode(new)
            lp = _log_softmax(local.next_logits([ids])[0])
            first = choice["logprobs"]["top_logprobs"][0]
            order = np.argsort(-lp, kind="stable")[:5]
            assert set(first) == {token_text(local.tokenizer, j) for j in order}
            for j in order:
                assert first[token_text(local.tokenizer, j)] == pytest.approx(lp[j], abs=1e-4)
            assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(lp[new[0]], abs=1e-4)
            # later steps: the log-softmax after the greedy prefix
            lp2 = _log_softmax(local.next_logits([ids + new[:1]])[0])
            assert choice["logprobs"]["token_logprobs"][1] == pytest.approx(lp2[new[1]], abs=1e-4)
        status, chat = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[0]}],
                                                          "max_tokens": 1, "logprobs": True, "top_logprobs": 20})
        assert status == 200
        c = chat["choices"][0]
        ids = local.tokenizer.encode(prompts[0], add_special_tokens=False).ids
        lp = _log_softmax(local.next_logits([ids])[0])
        top = c["logprobs"]["content"][0]["top_logprobs"]
        assert len(top) == 20 and top[0]["logprob"] == pytest.approx(lp.max(), abs=1e-4)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert c["message"]["content"] == local.decode([int(np.argmax(lp))])
        status, plain = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[0]}],
                                                           "max_tokens": 1})
        assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == c["message"]
        # logit_bias shifts the logits before the greedy choice and the log-probabilities
        pick = int(np.argsort(lp)[len(lp) // 2])  # a middling token, boosted to the top
        status, biased = post(url, "/v1/completions", {"prompt": prompts[0], "max_tokens": 1, "logprobs": 2,
                                                       "logit_bias": {str(pick): 100}})
        shifted = lp.copy()
        shifted[pick] += 100
        shifted = _log_softmax(shifted)
        assert status == 200 and biased["choices"][0]["text"] == local.decode([pick])
        assert biased["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(shifted[pick], abs=1e-4)
        for path, bad in (("/v1/completions", {"prompt": ""}), ("/v1/completions", {"prompt": "a", "logprobs": 21}),
                          ("/v1/completions", {"prompt": "a", "max_tokens": -1}),
                          ("/v1/completions", {"prompt": "a", "echo": True}),
                          ("/v1/chat/completions", {"messages": "hi"}),
                          ("/v1/chat/completions", {"messages": [{"role": "user"}]}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 1}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
                          ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}),
                          ("/v1/completions", {"prompt": "a", "logit_bias": {"-5": 1}}),
                          ("/v1/completions", {"prompt": "a", "logit_bias": {"99999999": 1}}),
                          ("/v1/completions", {"prompt": "a", "logit_bias": [1]})):
            status, err = post(url, path, bad)
            assert status == 400, (path, bad, err)


# a chat template in the BERT tokenizer's own special tokens (the tiny decoder uses MiniLM's tokenizer)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
            "{% endif %}[MASK] {{ m['role'] }} : {{ m['content'] }} {{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[MASK] assistant :{% endif %}")


def test_chat_route_applies_the_folders_chat_template(tmp_path, lm_path):
    """An export folder whose tokenizer_config.json carries a chat template is served as vLLM
    serves it: the messages rendered with the template (bos/eos from the config) and tokenised
    without added special tokens — the prompt ids transformers' ``apply_chat_template`` gives,
    and the greedy token and log-probabilities of the local model on those ids; ``none`` serves
    the contents joined; a template that refuses the messages is a 400."""
    import shutil
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    lm_path = Path(lm_path)
    folder = tmp_path / "served"
    shutil.copytree(lm_path.parent, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg.update(chat_template=TEMPLATE, bos_token="[CLS]", eos_token={"content": "[SEP]", "special": True})
    cfg_path.write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "the meaning of a list is"},
            {"role": "assistant", "content": "numbers"}, {"role": "user", "content": "and strings"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=TEMPLATE,
                                 bos_token="[CLS]", eos_token="[SEP]")
    ref = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    local = CausalLM(folder / lm_path.name, provider="cpu")
    plain = local.tokenizer.encode("\n".join(m["content"] for m in msgs), add_special_tokens=False).ids
    assert ref[0] == hf.convert_tokens_to_ids("[CLS]") and ref != plain
    body = {"messages": msgs, "max_tokens": 2, "logprobs": True, "top_logprobs": 5}
    for template, ids in (("auto", ref), ("none", plain)):
        with serving(folder / lm_path.name, chat_template=template) as url:
            status, chat = post(url, "/v1/chat/completions", body)
            assert status == 200 and chat["usage"]["prompt_tokens"] == len(ids)
            lp = _log_softmax(local.next_logits([ids])[0])
            first = chat["choices"][0]["logprobs"]["content"][0]
            assert first["logprob"] == pytest.approx(lp.max(), abs=1e-4)
            assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(np.sort(lp)[::-1][:5], abs=1e-4)
            assert chat["choices"][0]["message"]["content"] == local.decode(local.generate_ids(ids, 2))
            status, health = request(url, "GET", "/health")
            assert health["chat_template"] == ("tokenizer_config.json" if template == "auto" else None)
            if template == "auto":
                status, err = post(url, "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]})
                assert status == 400 and "no system" in err["error"]


def test_verify_through_serve_openai_routes(tmp_path, llama_rtn_export, llama_board):
    """A marked decoder behind ``quantseal serve`` with a bearer token, read through
    ``/v1/completions`` (log-probabilities, batched prompts) and ``/v1/chat/completions``."""
    ck = llama_rtn_export[0]
    key, reg, tok = tmp_path / "k", tmp_path / "r.json", tmp_path / "token"
    qk.write_key(key, KEY)
    tok.write_text("serve-token\n")
    for user in ("ann", "ben"):
        assert run(["registry", "add", reg, "--key", key, "--user", user, "--bits", 32])[0] == 0
    marked = tmp_path / "ben" / "model.onnx"
    assert run(["export", ck, "-o", marked, "--board", llama_board.path, "--key", key, "--registry", reg,
                "--user", "ben"])[0] == 0
    flags = ["--board", llama_board.path, "--key", key, "--registry", reg, "--json"]
    with serving(marked, max_batch=32, token="serve-token") as url:  # /logits: verify sends 32 rows
        rc, _, err = run(["verify", url, "--api", "openai-completions", *flags])
        assert rc == 2 and "HTTP 401" in err
        rc, out, err = run(["verify", url, "--api", "quantseal", "--api-key-file", tok, *flags])  # POST /logits
        assert rc == 0 and json.loads(out.strip().splitlines()[-1])["owner"] == "ben", err
        for api in ("openai-completions", "openai-chat"):
            rc, out, err = run(["verify", url + "/v1", "--api", api, "--api-key-file", tok, *flags])
            assert rc == 0, err
            res = json.loads(out.strip().splitlines()[-1])
            assert res["owner"] == "ben" and res["bit_errors"] == 0 and res["read_from"] == "logprobs", res
            assert res["censored"] == 0 and res["logit_bias"] is True
