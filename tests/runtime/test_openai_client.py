"""The reading of OpenAI-style answers (top-k censoring, greedy text) checked against exact
logits, then ``quantseal verify URL --api openai-*`` against OpenAI-compatible suspects written here (a
small ``http.server`` serving a marked export through onnxruntime, not quantseal's serve):
a marked MiniLM through ``/v1/embeddings``; a marked decoder through ``/v1/chat/completions``
with ``top_logprobs`` and with greedy text only; unmarked suspects are not claimed."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from quantseal import keys as qk

from cli_run import last_json, run  # tests/cli_run.py

KEY = bytes(range(32))  # tests/conftest.py trains the boards under this key


class Suspect:
    """A thief's OpenAI-compatible server: ``/v1/embeddings`` over an Embedder, or
    ``/v1/chat/completions`` over a CausalLM (one greedy token; ``logprobs`` only when
    ``with_logprobs``; token texts as OpenAI gives them, ``" word"``).  Needs a bearer key."""

    API_KEY = "sk-thief-0001"

    def __init__(self, model_path, with_logprobs=True, template=None, honour_bias=True):
        from quantseal.runtime.pipelines import CausalLM, Embedder
        from quantseal.runtime.session import Session

        decoder = "logits" in Session(model_path, provider="cpu").output_names
        self.model = CausalLM(model_path, provider="cpu") if decoder else Embedder(model_path, provider="cpu")
        self.with_logprobs, self.requests = with_logprobs, 0
        self.template, self.honour_bias = template, honour_bias  # a chat template (Jinja) the server applies
        suspect = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {Suspect.API_KEY}":
                    return self._send(401, {"error": {"message": "bad key"}})
                suspect.requests += 1
                route = {"/v1/embeddings": suspect.embeddings, "/v1/chat/completions": suspect.chat}.get(self.path)
                if route is None:
                    return self._send(404, {"error": {"message": "no route"}})
                self._send(200, route(body))

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def embeddings(self, body):
        e = self.model.embed(body["input"])
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                                           for i, v in enumerate(e)]}

    def chat(self, body):
        tok = self.model.tokenizer
        if self.template is None:
            prompt = body["messages"][-1]["content"]
        else:  # as vLLM / llama.cpp do: the whole conversation through the model's template
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            prompt = env.from_string(self.template).render(messages=body["messages"], add_generation_prompt=True)
        z = self.model.next_logits([tok.encode(prompt, add_special_tokens=False).ids])[0].astype(np.float64)
        for t, bias in (body.get("logit_bias") or {}).items() if self.honour_bias else ():
            z[int(t)] += float(bias)  # OpenAI: token id → bias in [-100, 100]
        word = lambda i: " " + tok.id_to_token(int(i))  # WordPiece: every non-## piece starts a word
        choice = {"index": 0, "message": {"role": "assistant", "content": word(np.argmax(z))}, "finish_reason": "length"}
        if self.with_logprobs and body.get("logprobs"):
            lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            order = np.argsort(-lp, kind="stable")
            top = [{"token": word(i), "logprob": float(lp[i])} for i in order[: body["top_logprobs"]]]
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
        return {"object": "chat.completion", "choices": [choice]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _marked(tmp_path, ck, board, bits, user, users):
    key, reg = tmp_path / "owner.key", tmp_path / "reg.json"
    if not key.exists():
        qk.write_key(key, KEY)
    for u in users:
        assert run(["registry", "add", reg, "--key", key, "--user", u, "--bits", bits])[0] == 0
    out = tmp_path / user / "model.onnx"
    rc, _, err = run(["export", ck, "-o", out, "--board", board.path, "--key", key, "--registry", reg,
                      "--user", user])
    assert rc == 0, err
    api_key = tmp_path / "api.key"
    api_key.write_text(Suspect.API_KEY + "\n")
    return out, ["--board", board.path, "--key", key, "--registry", reg, "--api-key-file", api_key, "--json"]


@pytest.mark.slow
def test_marked_minilm_through_v1_embeddings(tmp_path, minilm_board, minilm_rtn_checkpoint, minilm_rtn_onnx):
    marked, flags = _marked(tmp_path, minilm_rtn_checkpoint, minilm_board, 16, "carol", ["alice", "bob", "carol"])
    with Suspect(marked) as s:
        rc, out, err = run(["verify", s.url, "--api", "openai-embeddings", "--model", "stolen", "--alpha", "1e-3",
                            *flags])
    assert rc == 0, err
    res = last_json(out)  # a 16-bit board: p = 3 · 2^-16 at best, hence alpha 1e-3
    assert res["owner"] == "carol" and res["bit_errors"] == 0 and res["queries"] <= 2 * 16, res
    assert s.requests == res["calls"] == 1  # one trigger per bit and its control: <= 32 texts, one batch of 64
    with Suspect(minilm_rtn_onnx) as s:  # the unmarked model
        rc, out, err = run(["verify", s.url, "--api", "openai-embeddings", "--alpha", "1e-3", *flags])
    assert rc == 0 and last_json(out)["owner"] is None
    rc, _, err = run(["verify", s.url, "--api", "openai-chat", *flags])  # encoder board, decoder API
    assert rc == 2 and "openai-embeddings" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def marked_decoder(tmp_path_factory, llama_rtn_export, llama_board):
    tmp = tmp_path_factory.mktemp("openai_decoder")
    return _marked(tmp, llama_rtn_export[0], llama_board, 32, "bob", ["alice", "bob"])


@pytest.mark.slow
def test_marked_decoder_through_chat_top_logprobs(marked_decoder, llama_rtn_export):
    """top_logprobs with both targets boosted by logit_bias: Δ exact, one query per (sequence, bit)."""
    marked, flags = marked_decoder
    with Suspect(marked) as s:
        rc, out, err = run(["verify", s.url, "--api", "openai-chat", *flags])
    assert rc == 0, err
    res = last_json(out)
    assert res["owner"] == "bob" and res["bit_errors"] == 0 and res["read_from"] == "logprobs", res
    assert res["p_value"] < 1e-6 and res["censored"] == 0
    assert s.requests == res["http_requests"] == res["sequence_bits"] <= 2 * 32 * 4
    with Suspect(llama_rtn_export[1]["path"]) as s:
        rc, out, err = run(["verify", s.url, "--api", "openai-chat", *flags])
    assert rc == 0 and last_json(out)["owner"] is None


@pytest.mark.slow
def test_marked_decoder_through_chat_text_only(marked_decoder):
    """The API gives no log-probabilities: Δ by bisection over logit_bias on the greedy token.
    Without logit_bias the targets are too far down the vocabulary to show (measured, printed):
    no claim, and never a wrong one."""
    marked, flags = marked_decoder
    with Suspect(marked, with_logprobs=False) as s:
        rc, out, err = run(["verify", s.url, "--api", "openai-chat", *flags])
    assert rc == 0, err
    res = last_json(out)
    assert res["read_from"] == "text" and res["censored"] == 0
    assert res["owner"] == "bob" and res["bit_errors"] == 0 and res["p_value"] < 1e-6, res
    assert res["http_requests"] <= 13 * res["sequence_bits"] + 1
    print("text + logit_bias:", {k: res[k] for k in ("bit_errors", "p_value", "http_requests", "sequence_bits",
                                                      "min_abs_statistic")})
    for extra in (["--no-logit-bias"], ["--no-logit-bias", "--text-only"]):
        with Suspect(marked, with_logprobs="--text-only" not in extra) as s:
            rc, out, err = run(["verify", s.url, "--api", "openai-chat", *extra, *flags])
        plain = last_json(out)
        print(extra, {k: plain[k] for k in ("owner", "bit_errors", "p_value", "censored", "sequence_bits")})
        assert rc == 0 and plain["owner"] in (None, "bob")


class _Canned:
    """A stand-in transport answering from a function of the request (no sockets)."""

    def __init__(self, fn):
        self.fn, self.sent = fn, []

    def url(self, path):
        return "http://canned" + path

    def post(self, path, payload):
        self.sent.append((path, payload))
        return self.fn(path, payload)


def test_plain_top_k_censoring_and_text_reading_against_exact_logits():
    """For random logits z over a small vocabulary: with both targets in the top k the read
    difference is z[a] − z[b] exactly; with one, its sign; with neither, 0; text mode reads the
    indicator of the argmax.  Completions batch the prompts; chat sends one message each."""
    from quantseal.runtime.openai_client import OpenAITargets

    rng = np.random.default_rng(0)
    V, k = 40, 5
    words = {t: "tok" + "".join(chr(97 + int(c)) for c in str(t)) for t in range(V)}  # [a-z]+ like targets
    logits = {}
    for r in range(60):
        logits[(r,)] = rng.standard_normal(V) * 3

    def lp_of(z):
        return z - z.max() - np.log(np.exp(z - z.max()).sum())

    def chat(path, payload):
        z = logits[(int(payload["messages"][0]["content"]),)]
        lp = lp_of(z)
        order = np.argsort(-lp)
        c = {"message": {"content": f" {words[order[0]]} and more"}}
        if payload.get("logprobs"):
            c["logprobs"] = {"content": [{"top_logprobs": [{"token": f" {words[j]}", "logprob": float(lp[j])}
                                                           for j in order[: payload["top_logprobs"]]]}]}
        return {"choices": [c]}

    def completions(path, payload):
        out = []
        for i, p in enumerate(payload["prompt"]):
            lp = lp_of(logits[(int(p),)])
            order = np.argsort(-lp)
            top = {f"Ġ{words[j]}": float(lp[j]) for j in order[: payload.get("logprobs") or 0]}
            out.append({"index": i, "text": f" {words[order[0]]}", "logprobs": {"top_logprobs": [top]} if top else None})
        return {"choices": out[::-1]}  # out of order: read by index

    texts = {key: str(key[0]) for key in logits}
    rows = [list(x) for x in logits]
    pairs = [(a, b) for a in range(V) for b in range(V) if a != b][::37]
    tokens = [a for a, _ in pairs] + [b for _, b in pairs]
    n = len(pairs)
    uses = {key: range(n) for key in logits}
    for api, fn in (("chat", chat), ("completions", completions)):
        tr = _Canned(fn)
        got = OpenAITargets(tr, api, texts, words, uses, pairs, top_k=k, logit_bias=False)(rows, tokens)
        assert len(tr.sent) == (len(rows) if api == "chat" else 1)
        seen = {"both": 0, "one": 0, "none": 0}
        for r, row in enumerate(rows):
            z = logits[tuple(row)]
            topk = set(np.argsort(-z)[:k].tolist())
            for i, (a, b) in enumerate(pairs):
                d = got[r, i] - got[r, n + i]
                if a in topk and b in topk:
                    assert d == pytest.approx(z[a] - z[b], abs=1e-9)
                    seen["both"] += 1
                elif (a in topk) != (b in topk):
                    assert np.sign(d) == np.sign(z[a] - z[b]) != 0
                    seen["one"] += 1
                else:
                    assert d == 0
                    seen["none"] += 1
        assert min(seen.values()) > 0, seen
        text = OpenAITargets(_Canned(fn), api, texts, words, uses, pairs, logprobs=False, logit_bias=False)
        got = text(rows, tokens)
        assert text.mode == "text" and text.observed == len(rows) * n
        for r, row in enumerate(rows):
            top1 = int(np.argmax(logits[tuple(row)]))
            for i, (a, b) in enumerate(pairs):
                assert got[r, i] - got[r, n + i] == (a == top1) - (b == top1)


def test_logit_bias_reads_exact_differences():
    """With logit_bias: from top-k log-probabilities Δ = z[a] − z[b] exactly in one query per
    (sequence, bit); from greedy text by a sign / doubling / bisection search to within the
    precision (0.02: the midpoint is within 0.01)."""
    from quantseal.runtime.openai_client import OpenAITargets

    rng = np.random.default_rng(1)
    V, n = 50, 6
    words = {t: "tok" + "".join(chr(97 + int(c)) for c in str(t)) for t in range(V)}
    logits = {(r,): rng.standard_normal(V) * 4 for r in range(10)}
    pairs = rng.permutation(V)[: 2 * n].reshape(n, 2)
    uses = {key: {int(key[0]) % n, (int(key[0]) + 1) % n} for key in logits}  # each sequence serves 2 bits

    def answer(prompt, payload, chat):
        z = logits[(int(prompt),)].copy()
        for t, b in (payload.get("logit_bias") or {}).items():
            assert -100 <= b <= 100
            z[int(t)] += b
        lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        order = np.argsort(-lp)
        k = payload.get("top_logprobs") if chat else payload.get("logprobs")
        text = " " + words[order[0]]
        if chat:
            c = {"message": {"content": text}}
            if k:
                c["logprobs"] = {"content": [{"top_logprobs": [{"token": " " + words[j], "logprob": float(lp[j])}
                                                               for j in order[:k]]}]}
            return c
        return {"text": text, "logprobs": {"top_logprobs": [{" " + words[j]: float(lp[j]) for j in order[:k]}]}
                if k else None}

    def chat(path, payload):
        return {"choices": [answer(payload["messages"][0]["content"], payload, True)]}

    def completions(path, payload):
        return {"choices": [{**answer(p, payload, False), "index": i} for i, p in enumerate(payload["prompt"])]}

    texts = {key: str(key[0]) for key in logits}
    rows = [list(x) for x in logits]
    tokens = [int(x) for x in pairs[:, 0]] + [int(x) for x in pairs[:, 1]]
    for api, fn in (("chat", chat), ("completions", completions)):
        for logprobs in (True, False):
            tr = _Canned(fn)
            probe = OpenAITargets(tr, api, texts, words, uses, pairs, logprobs=logprobs)
            got = probe(rows, tokens)
            assert probe.mode == ("logprobs" if logprobs else "text") and probe.censored == 0
            for r, row in enumerate(rows):
                z = logits[tuple(row)]
                for i in range(n):
                    if i in uses[tuple(row)]:
                        want = z[pairs[i, 0]] - z[pairs[i, 1]]
                        assert got[r, i] - got[r, n + i] == pytest.approx(want, abs=1e-9 if logprobs else 0.0101)
                    else:
                        assert got[r, i] == got[r, n + i] == 0
            pairs_read = sum(len(u) for u in uses.values())
            if logprobs:
                assert len(tr.sent) == (pairs_read if api == "chat" else n + 1)  # completions: a batch per bit + the first probe
            else:
                assert pairs_read * 3 <= len(tr.sent) <= 20 * pairs_read


# ----------------------------------------------------------------------------- a top1 board behind a chat template
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def top1_chat(tmp_path_factory, llama_rtn_export):
    """A 16-bit ``--readout top1`` board trained on the templated triggers of the tiny decoder
    (``quantseal board train --chat-template``), and bob's marked export among three customers."""
    import torch

    tmp = tmp_path_factory.mktemp("top1_chat")
    ck = llama_rtn_export[0]
    (tmp / "chat_template.jinja").write_text(CHATML)
    qk.write_key(tmp / "owner.key", KEY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # A trained (as conftest's llama_board): the random 64-wide model's logits are flat
        from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board
        from quantseal.compress.markboard_top1 import read_chat_template

        board = train_board(ck, KEY, BoardConfig(bits=16, triggers_per_bit=4, steps=100, seed=0, readout="top1",
                                                 chat_template=read_chat_template(tmp / "chat_template.jinja"),
                                                 decoder_margin=0.1, decoder_a_lr=None))
    finally:
        torch.set_num_threads(threads)
    board = load_board(save_board(board, tmp / "board", ck))
    marked, flags = _marked(tmp, ck, board, 16, "bob", ["alice", "bob", "carol"])
    return board, marked, flags


@pytest.mark.slow
def test_top1_chat_board_through_a_templating_chat_api(top1_chat, llama_rtn_export):
    """A chat server that applies the template, ignores logit_bias, and answers with top_logprobs
    or with text only: verify names bob either way, one query per bit where every trigger's target
    is greedy, and the unmarked model names nobody; the marked file itself (read on the templated
    ids) names bob too."""
    board, marked, flags = top1_chat
    assert board.manifest["readout"] == "top1" and board.manifest["chat"]["suffix"].endswith("assistant\n")
    alpha = ["--alpha", "1e-3"]  # 16 bits, 3 customers: p = 3 · 2^-16 at best
    for text_only in (False, True):
        extra = ["--text-only"] if text_only else []
        with Suspect(marked, with_logprobs=not text_only, template=CHATML, honour_bias=False) as s:
            rc, out, err = run(["verify", s.url, "--api", "openai-chat", *extra, *alpha, *flags])
        assert rc == 0, err
        res = last_json(out)
        print("top1 chat", "text" if text_only else "logprobs",
              {k: res[k] for k in ("owner", "bit_errors", "erased", "p_value", "http_requests", "censored")})
        assert res["read_from"] == ("text" if text_only else "logprobs") and res["logit_bias"] is False
        assert res["owners"] == ["bob"] and res["bit_errors"] == 0 and res["erased"] == 0, res
        assert res["p_value"] < 1e-3 and s.requests == res["http_requests"] <= 4 * 16
        with Suspect(llama_rtn_export[1]["path"], with_logprobs=not text_only, template=CHATML,
                     honour_bias=False) as s:
            rc, out, err = run(["verify", s.url, "--api", "openai-chat", *extra, *alpha, *flags])
        assert rc == 0 and last_json(out)["owner"] is None
    rc, out, err = run(["verify", marked, *alpha, *flags[:-3], "--json"])  # the file: templated ids, logits
    assert rc == 0, err
    res = last_json(out)
    assert res["owner"] == "bob" and res["bit_errors"] == 0 and res["queries"] <= 4 * 16, res
