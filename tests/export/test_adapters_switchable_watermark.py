"""Switchable adapters with a customer's watermark (issue #13 §5 + Hot-Swap MarkBoard):
``export --switchable --adapter A --adapter B --board --key --registry --user ID``.  The mark lives
in the token table, which every ``adapter_id`` reads, so ``verify`` names the customer whichever
branch the suspect runs — through the file with each id and through ``serve --adapter`` — while
each branch still computes its adapter (id 0 equals the plain marked export; id j on clean text
equals the unmarked switchable export's id j).  A token-embedding LoRA (the table the mark lives
in) folds beside the marked table (``export --adapter --board`` without ``--switchable``) and is
refused as a switchable branch with one line, exit 2, nothing written."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from quantseal.keys import write_key

from cli_run import last_json, run  # tests/cli_run.py
from peft_adapters import peft_lora  # tests/peft_adapters.py

KEY = bytes(range(32))  # tests/conftest.py's WATERMARK_KEY: the boards are trained under it
CUSTOMERS = ["acme", "globex", "initech"]


def _owner_files(root, bits):
    key = root / "key"
    write_key(key, KEY)
    reg = root / "reg.db"
    for c in CUSTOMERS:
        assert run(["registry", "add", reg, "--key", key, "--user", c, "--bits", str(bits)])[0] == 0
    return key, reg


def _verify(suspect, board, key, reg, *extra):
    rc, out, err = run(["verify", suspect, "--board", board, "--key", key, "--registry", reg, "--json", *extra])
    assert rc == 0, err
    return last_json(out)


def _serve(path, adapter):
    from quantseal.runtime.server import make_server, server_url, service_for

    server = make_server(service_for(path, provider="cpu", adapter=adapter), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, server_url(server)


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.parametrize("layout", ["llama_board", "llama_board_input"])
def test_decoder_mark_in_every_branch(llama_rtn_export, layout, tiny_llama_sharp_dir, tmp_path, request):
    """Both layouts (conftest: ``llama_board`` marks the tied table, ``llama_board_input`` the input
    side): every adapter_id of a switchable export carries the customer's mark."""
    from quantseal.runtime.pipelines import CausalLM

    llama_board = request.getfixturevalue(layout)

    ck = llama_rtn_export[0]
    key, reg = _owner_files(tmp_path, llama_board.manifest["bits"])
    a = peft_lora(tiny_llama_sharp_dir, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_lora(tiny_llama_sharp_dir, tmp_path / "b", 2, scale=0.1, r=4, lora_alpha=8,
                  target_modules=["k_proj", "o_proj", "down_proj"])
    mark = ["--board", llama_board.path, "--key", key, "--registry", reg, "--user", "globex", "--seed", "3"]
    adapters = ["--adapter", f"alpha={a}", "--adapter", f"beta={b}", "--switchable", "--accuracy-level", "0"]
    sw, plain_sw, marked = (tmp_path / n / "model.onnx" for n in ("sw", "plain_sw", "marked"))
    rc, out, err = run(["export", ck, "-o", sw, *adapters, *mark, "--json"])
    assert rc == 0, err
    report = last_json(out)
    assert report["marked"] and "adapter_id" in report["inputs"]
    assert [(c["adapter"], c["owner"]) for c in report["mark_check"]] == [(None, "globex"), ("alpha", "globex"),
                                                                         ("beta", "globex")]
    assert run(["export", ck, "-o", plain_sw, *adapters])[0] == 0
    again = tmp_path / "again" / "model.onnx"  # same inputs + seed → same bytes
    assert run(["export", ck, "-o", again, *adapters, *mark])[0] == 0
    assert again.read_bytes() == sw.read_bytes()
    assert run(["export", ck, "-o", marked, *mark, "--accuracy-level", "0"])[0] == 0

    # each branch computes its adapter: id 0 = the plain marked export; id j on clean text (no
    # trigger token) = the unmarked switchable file's id j on every logit but the marked rows' (tied head)
    from quantseal import keys as qk
    from quantseal.text import TextTokenizer

    triggers = qk.triggers_of(llama_board.manifest, KEY, TextTokenizer(llama_board.path))
    marked_rows = np.unique(triggers.tokens)
    ids = np.array([[1, 7592, 2088, 2003, 102, 55, 999, 3231]])
    assert not np.isin(ids, marked_rows).any()
    lm, plain = CausalLM(sw, provider="cpu"), CausalLM(plain_sw, provider="cpu")
    want0 = CausalLM(marked, provider="cpu").logits(ids)
    keep = np.setdiff1d(np.arange(want0.shape[-1]), marked_rows)
    scale = np.abs(want0).max()
    assert np.abs(lm.logits(ids) - want0).max() <= 1e-5 * scale
    for name in ("alpha", "beta"):
        got, ref = lm.logits(ids, adapter=name), plain.logits(ids, adapter=name)
        assert np.abs(got[..., keep] - ref[..., keep]).max() <= 1e-5 * scale, name
        assert np.abs(got - want0).max() > 1e-2 * scale, name  # the branch is really taken

    for pick in (None, "alpha", "2"):  # through the file, each adapter_id (by name or id; 2 = beta)
        res = _verify(sw, llama_board.path, key, reg, *(["--adapter", pick] if pick else []))
        assert res["owners"] == ["globex"] and res["p_value"] < 1e-6, (pick, res)
    res = _verify(plain_sw, llama_board.path, key, reg, "--adapter", "beta")  # unmarked: nobody
    assert res["owners"] == []
    server, thread, url = _serve(sw, "beta")  # through serve --adapter beta
    try:
        res = _verify(url, llama_board.path, key, reg)
    finally:
        _stop(server, thread)
    assert res["owners"] == ["globex"], res
    server, thread, url = _serve(sw, None)  # one server, the adapter per request
    try:
        by_body = _verify(url, llama_board.path, key, reg, "--adapter", "alpha")  # "adapter" on /logits
        by_model = _verify(url, llama_board.path, key, reg, "--api", "openai-completions", "--model", "beta")
    finally:
        _stop(server, thread)
    assert by_body["owners"] == by_model["owners"] == ["globex"], (by_body, by_model)

    owner = ["--board", llama_board.path, "--key", key, "--registry", reg]
    for suspect, extra, msg in ((sw, ["--adapter", "gamma"], "no adapter named 'gamma' (it has alpha, beta)"),
                                (sw, ["--adapter", "7"], "adapter id 7 is not in 0..2"),
                                (marked, ["--adapter", "alpha"], "has no switchable adapters"),
                                ("http://127.0.0.1:9", ["--api", "openai-completions", "--adapter", "alpha"],
                                 "selects an adapter by --model NAME")):
        rc, _, err = run(["verify", suspect, *owner, *extra])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (extra, err)

    if layout != "llama_board":  # the input-side board's mark survives this adapter: nothing to refuse
        return
    # an adapter strong enough to flip bits (lora_B ~ N(0, 0.3²)) is refused by the owner-side check
    loud = peft_lora(tiny_llama_sharp_dir, tmp_path / "loud", 2, r=4, lora_alpha=8,
                     target_modules=["k_proj", "o_proj", "down_proj"])
    out = tmp_path / "refused"
    rc, _, err = run(["export", ck, "-o", out / "model.onnx", "--adapter", f"alpha={a}", "--adapter", f"loud={loud}",
                      "--switchable", *mark])
    assert rc == 2 and "adapter 'loud' (adapter_id 2) hides the watermark" in err, err
    assert len(err.strip().splitlines()) == 1 and (not out.exists() or not list(out.iterdir()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".quantseal")]  # no staging left behind


def _embedding_lora(base_dir, out):
    """A peft LoRA on the token table and q_proj, saved without a full copy of the (tied) table."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out, save_embedding_layers=False)
    return out


def test_a_lora_on_the_marked_table(llama_rtn_export, llama_board, tiny_llama_sharp_dir, tmp_path):
    """The token table carries the mark.  Folded (no --switchable), a LoRA on it becomes a
    low-rank branch beside the marked table: the export names the customer (checked before
    publishing, and by verify), and off the marked rows its logits equal the unmarked folded
    export's.  As a switchable branch it would be a second, per-adapter table: refused with one
    line, exit 2, nothing written."""
    from quantseal import keys as qk
    from quantseal.runtime.pipelines import CausalLM
    from quantseal.text import TextTokenizer

    ck = llama_rtn_export[0]
    key, reg = _owner_files(tmp_path, llama_board.manifest["bits"])
    emb = _embedding_lora(tiny_llama_sharp_dir, tmp_path / "emb")
    lin = peft_lora(tiny_llama_sharp_dir, tmp_path / "lin", 5, r=4, lora_alpha=8, target_modules=["q_proj"])
    mark = ["--board", llama_board.path, "--key", key, "--registry", reg, "--user", "acme"]
    out = tmp_path / "out"
    cases = {
        "embedding lora": (["--adapter", lin, "--adapter", emb, "--switchable", *mark], "token-embedding LoRA is not switchable"),
        "half a mark": (["--adapter", lin, "--switchable", "--board", llama_board.path], "needs all of --board"),
        "seed alone": (["--adapter", lin, "--seed", "1"], "--seed seeds a watermarked export"),
    }
    for name, (extra, msg) in cases.items():
        rc, _, err = run(["export", ck, "-o", out / "model.onnx", *extra])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() or list(out.iterdir()) == [], name

    folded, plain = tmp_path / "folded" / "model.onnx", tmp_path / "plain" / "model.onnx"
    rc, stdout, err = run(["export", ck, "-o", folded, "--adapter", emb, *mark, "--seed", "0", "--accuracy-level", "0",
                           "--json"])
    assert rc == 0, err
    report = last_json(stdout)
    assert report["marked"] and [c["owner"] for c in report["mark_check"]] == ["acme"]
    assert "model.embed_tokens" in report["adapters"]["matrices"]  # the table's LoRA, folded as a branch
    assert run(["export", ck, "-o", plain, "--adapter", emb, "--accuracy-level", "0"])[0] == 0
    res = _verify(folded, llama_board.path, key, reg)
    assert res["owners"] == ["acme"], res
    marked_rows = np.unique(qk.triggers_of(llama_board.manifest, KEY, TextTokenizer(llama_board.path)).tokens)
    ids = np.array([[1, 7592, 2088, 2003, 102, 55, 999, 3231]])
    assert not np.isin(ids, marked_rows).any()
    got, ref = CausalLM(folded, provider="cpu").logits(ids), CausalLM(plain, provider="cpu").logits(ids)
    base = CausalLM(llama_rtn_export[1]["path"], provider="cpu").logits(ids)
    keep = np.setdiff1d(np.arange(got.shape[-1]), marked_rows)
    scale = np.abs(ref).max()
    assert np.abs(got[..., keep] - ref[..., keep]).max() <= 1e-5 * scale
    assert np.abs(ref - base).max() > 1e-2 * scale  # the adapter matters


@pytest.mark.slow
def test_encoder_mark_in_every_branch(minilm_rtn_checkpoint, minilm_board, minilm_path, tmp_path):
    """MiniLM (RTN 4.5 bits, the 16-bit board): verify names the customer through the file with
    each adapter_id and through serve --adapter; each branch equals the unmarked switchable file's
    on clean text (1−cos ≤ 1e-6) and moves the embedding."""
    from quantseal.runtime.pipelines import Embedder

    key, reg = _owner_files(tmp_path, minilm_board.manifest["bits"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = peft_lora(minilm_path, tmp_path / "a", 1, scale=0.05, r=4, lora_alpha=8, target_modules=["query", "value"])
        b = peft_lora(minilm_path, tmp_path / "b", 2, scale=0.05, r=4, lora_alpha=8, target_modules=["key", "dense"])
        adapters = ["--adapter", f"alpha={a}", "--adapter", f"beta={b}", "--switchable"]
        mark = ["--board", minilm_board.path, "--key", key, "--registry", reg, "--user", "initech", "--seed", "1"]
        sw, plain_sw = tmp_path / "sw" / "model.onnx", tmp_path / "plain" / "model.onnx"
        rc, _, err = run(["export", minilm_rtn_checkpoint, "-o", sw, *adapters, *mark])
        assert rc == 0, err
        assert run(["export", minilm_rtn_checkpoint, "-o", plain_sw, *adapters])[0] == 0
    finally:
        torch.set_num_threads(threads)
    texts = ["The interpreter reads the source file.", "A module is a file containing definitions."]
    got, ref = Embedder(sw, provider="cpu"), Embedder(plain_sw, provider="cpu")
    base = got.embed(texts)
    for name in ("alpha", "beta"):
        x, y = got.embed(texts, adapter=name), ref.embed(texts, adapter=name)
        assert (1 - np.sum(x * y, 1)).max() <= 1e-6, name
        assert (1 - np.sum(x * base, 1)).min() > 1e-5, name
    for pick in (None, "alpha", "beta"):
        res = _verify(sw, minilm_board.path, key, reg, "--alpha", "1e-3", *(["--adapter", pick] if pick else []))
        assert res["owners"] == ["initech"] and res["bit_errors"] == 0, (pick, res)  # 16 bits: p = 3·2⁻¹⁶
    server, thread, url = _serve(sw, "beta")
    try:
        res = _verify(url, minilm_board.path, key, reg, "--alpha", "1e-3")
    finally:
        _stop(server, thread)
    assert res["owners"] == ["initech"], res
