"""Watermarked LLaMA-family decoders end to end: mark + export through the tied-head graph
(quantseal/export/decoder.py, quantseal/export/watermark.py), black-box verification from
next-token logits (quantseal/runtime/verify.py) of the ONNX file and of ``POST /logits``."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quantseal import keys as qk
from quantseal.checkpoint import load_compressed, read_checkpoint, write_checkpoint
from quantseal.export.watermark import export_marked, mark_checkpoint
from quantseal.runtime.client import EndpointCausalLM
from quantseal.runtime.pipelines import CausalLM
from quantseal.runtime.verify import onnx_logits_fn, verify
from quantseal.text import TextTokenizer, pydoc_sentences

from genai_greedy import og_greedy  # tests/export/genai_greedy.py

KEY = bytes(range(32))  # tests/conftest.py trains llama_board under this key
KEY2 = bytes(range(100, 132))
EMB = "model.embed_tokens"
CUSTOMERS = [f"customer-{i}" for i in range(6)]
VOCAB, HIDDEN = 30522, 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_rtn_export, llama_board):
    """Every customer of a 6-customer registry exported (the first traces, the rest swap into the
    template): {customer: (path, report)}, plus the registry."""
    ck = llama_rtn_export[0]
    reg = qk.Registry(KEY, 32)
    for c in CUSTOMERS:
        reg.add(c)
    root = tmp_path_factory.mktemp("llama_marked")
    shutil.rmtree(Path(llama_board.path) / "templates", ignore_errors=True)  # another test's template: trace anew
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {c: (root / c / "model.onnx") for c in CUSTOMERS}
        reports = {c: export_marked(ck, out[c], llama_board.path, KEY, reg, c, seed=i) for i, c in enumerate(CUSTOMERS)}
    finally:
        torch.set_num_threads(threads)
    return {c: (out[c], reports[c]) for c in CUSTOMERS}, reg


def run_verify(path, reg, board, key=KEY):
    return verify(onnx_logits_fn(path, provider="cpu", tokenizer=board.path), key, reg, board.manifest,
                  TextTokenizer(board.path))


def distinct_queries(board) -> int:
    """Distinct sequences among the triggers and controls (verification queries each once)."""
    ts = qk.triggers_of(board.manifest, KEY, TextTokenizer(board.path))
    flat = [t for trs in ts.triggers for t in trs]
    return len({t.ids for t in flat} | {t.control_ids for t in flat})


def test_every_customer_decodes_to_own_codeword(exported, llama_board):
    files, reg = exported
    queries = distinct_queries(llama_board)
    assert 32 * 4 < queries <= 2 * 32 * 4  # every trigger, and controls shared by bits once
    assert [files[c][1]["path_taken"] for c in CUSTOMERS] == ["traced"] + ["template"] * (len(CUSTOMERS) - 1)
    for c in CUSTOMERS:
        res = run_verify(files[c][0], reg, llama_board)
        assert res["owner"] == c and res["bit_errors"] == 0, (c, res)
        assert res["bits"] == "".join(map(str, reg.codeword(c)))
        assert res["p_value"] == pytest.approx(len(CUSTOMERS) * 2.0 ** -32)
        assert res["queries"] <= min(queries, 2 * 32)  # decided from one trigger per bit (and its control)


def test_innocent_models_are_not_claimed(exported, llama_rtn_export, llama_board, tmp_path):
    files, reg = exported
    unmarked = run_verify(llama_rtn_export[1]["path"], reg, llama_board)
    assert unmarked["owner"] is None and unmarked["p_value"] > 1e-3 and unmarked["bit_errors"] >= 4
    # another owner's key (its own triggers and targets, its own registry) on our customer's file
    m2 = dict(llama_board.manifest)
    tok = TextTokenizer(llama_board.path)
    ts2 = qk.derive_triggers(KEY2, tok, 32, m2["hosts"], 4, 2, 0, position="end", target_pairs=True)
    m2.update(key_id=qk.key_id(KEY2), trigger_digest=ts2.digest())
    reg2 = qk.Registry(KEY2, 32)
    for c in CUSTOMERS:
        reg2.add(c)
    other = verify(onnx_logits_fn(files[CUSTOMERS[0]][0], provider="cpu", tokenizer=llama_board.path), KEY2, reg2,
                   m2, tok)
    assert other["owner"] is None and other["p_value"] > 1e-3


def test_http_endpoint_equals_file(exported, llama_board):
    from quantseal.runtime.server import make_server, server_url, service_for

    files, reg = exported
    path = files[CUSTOMERS[2]][0]
    server = make_server(service_for(path, provider="cpu"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = verify(EndpointCausalLM(server_url(server)).next_logits, KEY, reg, llama_board.manifest,
                        TextTokenizer(llama_board.path))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    local = run_verify(path, reg, llama_board)
    for k in ("owner", "bits", "bit_errors", "p_value", "queries"):
        assert remote[k] == local[k]
    assert remote["owner"] == CUSTOMERS[2]
    assert remote["min_abs_statistic"] == pytest.approx(local["min_abs_statistic"], rel=1e-5)


def test_files_differ_in_the_table_store_it_once_hold_no_secrets(exported, llama_board):
    """The mark lives in the float table (no low-rank branch points at it): two customers' files
    differ in that table alone, which is stored once for the lookup and the tied head."""
    files, reg = exported
    protos = {c: onnx.load(str(files[c][0])) for c in CUSTOMERS[:2]}
    inits = {c: {t.name: numpy_helper.to_array(t) for t in p.graph.initializer} for c, p in protos.items()}
    a, b = (inits[c] for c in CUSTOMERS[:2])
    assert not any(k.startswith(EMB) and k.endswith((".L1", ".L2")) for k in a)
    assert {k for k in a if a[k].tobytes() != b[k].tobytes()} == {f"{EMB}.weight"}
    for c, arrays in inits.items():
        # the vocab × hidden table once (in either orientation), read by the Gather and by the head
        tables = [k for k, v in arrays.items() if sorted(v.shape) == sorted((VOCAB, HIDDEN))]
        assert tables == [f"{EMB}.weight"], tables
        users = [n.op_type for n in protos[c].graph.node if f"{EMB}.weight" in n.input]
        assert sorted(users) == ["Gather", "Gemm"]  # the head reads it as stored (transB): no copy
        blob = files[c][0].read_bytes()
        code_hex = qk.bits_to_hex(reg.codeword(c)).encode()
        for secret in (KEY, KEY.hex().encode(), c.encode(), code_hex, qk.key_id(KEY).encode(),
                       llama_board.manifest["trigger_digest"].encode()):
            assert secret not in blob


def _clean_ids(tok, n=12):
    return [ids for ids in (tok.encode_ids(s, special=False) for s in pydoc_sentences("evaluation")[:n])]


def _next_token_kl(p_logits, q_logits):
    lp = p_logits - np.logaddexp.reduce(p_logits, -1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, -1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_marked_next_token_distribution_matches_unmarked_and_torch(exported, llama_rtn_export, llama_board, tmp_path):
    """Held-out clean text: KL(unmarked ‖ marked) over every position is tiny; the exported
    marked graph equals torch's ``load_compressed`` of the marked checkpoint (TiedHead)."""
    files, reg = exported
    c = CUSTOMERS[1]
    tok = TextTokenizer(llama_board.path)
    seqs = _clean_ids(tok)
    plain = CausalLM(llama_rtn_export[1]["path"], provider="cpu")
    marked = CausalLM(files[c][0], provider="cpu")
    ref = np.concatenate([plain.logits(np.array(s)).astype(np.float64) for s in seqs])
    got = np.concatenate([marked.logits(np.array(s)).astype(np.float64) for s in seqs])
    kl = _next_token_kl(ref, got)
    assert kl < 2e-3, kl
    ck = llama_rtn_export[0]
    manifest, tensors = read_checkpoint(ck)
    mman, mt = mark_checkpoint(manifest, tensors, llama_board, KEY, reg, c, seed=CUSTOMERS.index(c))
    write_checkpoint(tmp_path / "ck", mman, mt, ck)
    model, _, _ = load_compressed(tmp_path / "ck")
    with torch.no_grad():
        tl = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs]).double().numpy()
    # torch (TiedHead over the marked table) and the exported graph of the same marked checkpoint
    np.testing.assert_allclose(got, tl, atol=2e-3 * np.abs(tl).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["tied", "input"])
def test_a_quantised_tied_table_carries_the_mark(tmp_path, llama_mb_export, side):
    """A decoder whose tied token table is quantised (``--budget-mb``): the board trains on it, and
    verification names each customer from the exported file; the second export swaps into the
    template.  ``tied``: each customer's trigger rows are requantised in the table's own format, the
    lookup (GatherBlockQuantized) and the head (MatMulNBits) read the same marked codes.  ``input``:
    the codes stay the unmarked export's, customers differ in the float32 ``mark_delta`` rows only,
    and clean text's logits are bit-identical to the unmarked export's."""
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board
    from quantseal.export.watermark import export_marked

    ck = llama_mb_export[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        board = train_board(ck, KEY, BoardConfig(bits=32, triggers_per_bit=4, steps=60, seed=0, decoder_a_lr=None,
                                                 mark_side=side))
    finally:
        torch.set_num_threads(threads)
    board = load_board(save_board(board, tmp_path / "board", ck))
    assert board.manifest["mark_side"] == side
    reg = qk.Registry(KEY, 32)
    for c in CUSTOMERS[:2]:
        reg.add(c)
    paths = {}
    for c in CUSTOMERS[:2]:
        paths[c] = tmp_path / c / "model.onnx"
        rep = export_marked(ck, paths[c], board.path, KEY, reg, c, seed=0)
        assert rep["path_taken"] == ("traced" if c == CUSTOMERS[0] else "template")
        res = run_verify(paths[c], reg, board)
        assert res["owner"] == c and res["bit_errors"] == 0
    a, b = ({t.name: numpy_helper.to_array(t) for t in onnx.load(str(paths[c])).graph.initializer} for c in CUSTOMERS[:2])
    changed = {k for k in a if a[k].tobytes() != b[k].tobytes()}
    if side == "tied":
        assert changed and changed <= {f"{EMB}.qweight", f"{EMB}.scales", f"{EMB}.qzeros"}
        return
    assert changed == {f"{EMB}.mark_delta"}
    unmarked = {t.name: numpy_helper.to_array(t) for t in onnx.load(llama_mb_export[1]["path"]).graph.initializer}
    assert all(a[k].tobytes() == v.tobytes() for k, v in unmarked.items())
    tok = TextTokenizer(board.path)
    trig = {int(x) for x in qk.triggers_of(board.manifest, KEY, tok).tokens.reshape(-1)}
    plain, lm = CausalLM(llama_mb_export[1]["path"], provider="cpu"), CausalLM(paths[CUSTOMERS[0]], provider="cpu")
    for ids in _clean_ids(tok)[:6]:
        if not trig.intersection(ids):
            assert plain.logits(np.array(ids)).tobytes() == lm.logits(np.array(ids)).tobytes()


def test_marked_folders_generate_in_onnxruntime_genai(exported, llama_board):
    """A customer's marked export (traced or swapped into the template) is an onnxruntime-genai
    folder: og generates from it the same greedy tokens as quantseal's runtime, and the file still
    names its customer."""
    from quantseal.runtime.pipelines import CausalLM

    files, reg = exported
    for c in (CUSTOMERS[0], CUSTOMERS[3]):  # the traced export and a template swap
        folder = files[c][0].parent
        assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        prompt = [101, 2023, 2003, 1037, 3231]
        out = og_greedy(folder, prompt, 8)
        lm = CausalLM(files[c][0], provider="cpu")
        lm.eos_ids = set()
        assert lm.generate_ids(prompt, len(out)) == out
        assert run_verify(files[c][0], reg, llama_board)["owner"] == c


def test_phi3_watermark_names_each_customer_and_runs_in_onnxruntime_genai(tmp_path, minilm_path):
    """A Phi-3 (tied table, partial rotary, longrope: the Phi-4-mini shape) marks like LLaMA: the
    board trains on its fused-projection checkpoint, each customer's export verifies to that
    customer with no bit error, and onnxruntime-genai generates from the marked folder as
    quantseal's runtime does."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from quantseal.cli import main
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board

    rope = {"type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)],
            "long_factor": [2.0 + 1.5 * i for i in range(8)]}
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                     original_max_position_embeddings=16, partial_rotary_factor=0.5, rope_scaling=rope,
                     tie_word_embeddings=True, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
        shutil.copyfile(minilm_path / "tokenizer.json", tmp_path / "src" / "tokenizer.json")
        ck = tmp_path / "ck"
        assert main(["compress", str(tmp_path / "src"), "-o", str(ck), "--method", "rtn", "--budget", "5",
                     "--workers", "1", "--json"]) == 0
        board = train_board(ck, KEY, BoardConfig(bits=32, triggers_per_bit=4, steps=60, seed=0, decoder_a_lr=None))
        board = load_board(save_board(board, tmp_path / "board", ck))
        reg = qk.Registry(KEY, 32)
        for c in CUSTOMERS[:2]:
            reg.add(c)
        for i, c in enumerate(CUSTOMERS[:2]):
            out = tmp_path / c / "model.onnx"
            export_marked(ck, out, board.path, KEY, reg, c, seed=i)
            res = run_verify(out, reg, board)
            assert res["owner"] == c and res["bit_errors"] == 0, (c, res)
    finally:
        torch.set_num_threads(threads)
    prompt = [101, 7592, 2088, 2003, 1037, 3231, 1012, 2023, 2003, 1037, 3231, 1012]  # + 8: past the switch (16)
    got = og_greedy(out.parent, prompt, 8)
    lm = CausalLM(out, provider="cpu")
    lm.eos_ids = set()
    assert len(got) == 8 and lm.generate_ids(prompt, 8) == got
