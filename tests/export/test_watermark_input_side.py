"""The input-side watermark layout of a tied decoder (``mark_side: input``,
quantseal/export/watermark.py, the lookup half in quantseal/export/decoder_graph.py): the table
and the tied head stay unmarked, the lookup adds ``mark_delta[mark_slots[ids]]``, so text without
trigger tokens gives bit-identical logits and greedy tokens, and the file still names its customer."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quantseal import keys as qk
from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.cli import main
from quantseal.compress.markboard import Board
from quantseal.errors import BadInput
from quantseal.export.watermark import export_marked, mark_checkpoint
from quantseal.runtime.pipelines import CausalLM
from quantseal.runtime.verify import onnx_logits_fn, verify
from quantseal.text import TextTokenizer, pydoc_sentences

from genai_greedy import og_greedy  # tests/export/genai_greedy.py

KEY = bytes(range(32))  # tests/conftest.py trains its boards under this key
EMB = "model.embed_tokens"
CUSTOMERS = ["alice", "bob", "carol"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def marked(tmp_path_factory, llama_rtn_export, llama_board_input):
    """Two customers exported with the input-side board (the first traces, the second swaps into the
    template): ({customer: model.onnx}, registry, {customer: report})."""
    ck = llama_rtn_export[0]
    reg = qk.Registry(KEY, 32)
    for c in CUSTOMERS:
        reg.add(c)
    root = tmp_path_factory.mktemp("llama_input_marked")
    shutil.rmtree(Path(llama_board_input.path) / "templates", ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = {c: root / c / "model.onnx" for c in CUSTOMERS[:2]}
        reports = {c: export_marked(ck, paths[c], llama_board_input.path, KEY, reg, c, seed=i)
                   for i, c in enumerate(CUSTOMERS[:2])}
    finally:
        torch.set_num_threads(threads)
    return paths, reg, reports


def _clean_ids(tok, trig: set[int], n=10) -> list[list[int]]:
    seqs = [tok.encode_ids(s, special=False) for s in pydoc_sentences("evaluation")[: 3 * n]]
    out = [s for s in seqs if len(s) >= 2 and not trig.intersection(s)][:n]
    assert len(out) == n
    return out


def _triggers(board):
    return qk.triggers_of(board.manifest, KEY, TextTokenizer(board.path))


def test_board_records_the_input_side_and_the_head_is_untouched(llama_board_input, llama_board):
    m, t = llama_board_input.manifest, llama_board.manifest
    assert m["mark_side"] == "input" and m["tied_head"] is True  # the default for a tied head
    assert t["mark_side"] == "tied"
    tr = m["training"]
    assert tr["head_kl_random_customer"] == 0.0 and tr["clean_positions"] == 0  # no head term to train
    assert tr["branches_below_margin"] == 0, tr


def test_clean_text_is_bit_identical_and_a_trigger_is_not(marked, llama_rtn_export, llama_board_input):
    """(a) On held-out text without trigger tokens the marked file's logits equal the unmarked
    export's bit for bit at every position; on a trigger they differ, and equal a torch forward of the
    unmarked compressed model whose trigger-token embeddings get the customer's ``C_s[T]·A``."""
    paths, reg, _ = marked
    c = CUSTOMERS[0]
    board = llama_board_input
    ts = _triggers(board)
    trig = {int(x) for x in ts.tokens.reshape(-1)}
    tok = TextTokenizer(board.path)
    plain = CausalLM(llama_rtn_export[1]["path"], provider="cpu")
    lm = CausalLM(paths[c], provider="cpu")
    for ids in _clean_ids(tok, trig):
        a, b = plain.logits(np.array(ids)), lm.logits(np.array(ids))
        assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes()

    model, _, _ = load_compressed(llama_rtn_export[0])
    emb = model.get_input_embeddings().weight.detach()
    rows = (board.branch_rows(reg.codeword(c)).double() @ board.tensors["A"].double()).float()  # (n·k, H)
    slot = {int(t): j for j, t in enumerate(ts.tokens.reshape(-1))}
    for t in (ts.triggers[0][0], ts.triggers[5][1]):
        ids = list(t.ids)
        got = lm.logits(np.array(ids)).astype(np.float64)
        ref_unmarked = plain.logits(np.array(ids)).astype(np.float64)
        delta = torch.stack([rows[slot[i]] if i in slot else torch.zeros(emb.shape[1]) for i in ids])
        with torch.no_grad():
            ref = model(inputs_embeds=(emb[ids] + delta)[None]).logits[0].double().numpy()
        last = -1  # the position after the pattern, where the bit is read
        assert np.abs(got[last] - ref_unmarked[last]).max() > 1e-2
        np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max(), rtol=0)


def test_greedy_generation_without_triggers_equals_the_unmarked_file(marked, llama_rtn_export, llama_board_input):
    """(b) Greedy tokens from a prompt without trigger tokens are the unmarked export's, through
    quantseal's runtime and through onnxruntime-genai, for the traced file and the template swap."""
    paths, _, _ = marked
    prompt = [101, 2023, 2003, 1037, 3231]
    trig = {int(x) for x in _triggers(llama_board_input).tokens.reshape(-1)}
    assert not trig.intersection(prompt)
    plain = CausalLM(llama_rtn_export[1]["path"], provider="cpu")
    plain.eos_ids = set()
    want = plain.generate_ids(prompt, 12)
    assert len(set(want)) > 3  # a wandering path, not one repeated token
    for c in CUSTOMERS[:2]:
        lm = CausalLM(paths[c], provider="cpu")
        lm.eos_ids = set()
        assert lm.generate_ids(prompt, 12) == want
        assert not trig.intersection(want)
        og_out = og_greedy(paths[c].parent, prompt, 12)
        assert og_out == want[: len(og_out)] and len(og_out) >= 4


def test_verify_names_each_customer(marked, llama_rtn_export, llama_board_input):
    """(c) verify reads each customer's codeword from its file with no bit error; the unmarked
    export is not claimed."""
    paths, reg, reports = marked
    board = llama_board_input
    assert [reports[c]["path_taken"] for c in CUSTOMERS[:2]] == ["traced", "template"]
    tok = TextTokenizer(board.path)
    for c in CUSTOMERS[:2]:
        res = verify(onnx_logits_fn(paths[c], provider="cpu", tokenizer=board.path), KEY, reg, board.manifest, tok)
        assert res["owner"] == c and res["bit_errors"] == 0, (c, res)
        assert res["bits"] == "".join(map(str, reg.codeword(c)))
    res = verify(onnx_logits_fn(llama_rtn_export[1]["path"], provider="cpu", tokenizer=board.path), KEY, reg,
                 board.manifest, tok)
    assert res["owner"] is None


def test_files_share_the_table_and_differ_in_the_delta_rows(marked, llama_rtn_export):
    """The table's initialisers are the unmarked export's (head and lookup); two customers differ in
    ``mark_delta`` alone; the correction costs (1 + n·k)·H float32 + V int32 bytes."""
    paths, reg, _ = marked
    load = lambda p: {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}  # noqa: E731
    a, b, u = load(paths[CUSTOMERS[0]]), load(paths[CUSTOMERS[1]]), load(llama_rtn_export[1]["path"])
    assert {k for k in a if a[k].tobytes() != b[k].tobytes()} == {f"{EMB}.mark_delta"}
    assert set(a) - set(u) == {f"{EMB}.mark_delta", f"{EMB}.mark_slots"}
    for k in u:
        assert a[k].tobytes() == u[k].tobytes(), k
    slots, delta = a[f"{EMB}.mark_slots"], a[f"{EMB}.mark_delta"]
    assert slots.dtype == np.int32 and delta.dtype == np.float32 and delta.shape == (1 + 32 * 2, 64)
    assert np.count_nonzero(slots) == 64 and sorted(slots[slots > 0]) == list(range(1, 65))
    assert not delta[0].any() and np.abs(delta[1:]).sum(1).min() > 0
    for c in CUSTOMERS[:2]:  # the file shows which rows carry a correction (the trade-off), never who or how
        blob = paths[c].read_bytes()
        for secret in (KEY, KEY.hex().encode(), c.encode(), qk.bits_to_hex(reg.codeword(c)).encode(),
                       qk.key_id(KEY).encode()):
            assert secret not in blob


def test_template_swap_is_byte_identical_to_a_single_export(marked, llama_rtn_export, llama_board_input, tmp_path):
    """(d) The second customer, written by swapping its delta rows into the template, equals the same
    customer exported alone (the template removed, so it traces) byte for byte, folder and all."""
    paths, reg, reports = marked
    c = CUSTOMERS[1]
    assert reports[c]["path_taken"] == "template"
    board = tmp_path / "board"
    shutil.copytree(llama_board_input.path, board)
    shutil.rmtree(board / "templates", ignore_errors=True)
    alone = tmp_path / "alone" / "model.onnx"
    rep = export_marked(llama_rtn_export[0], alone, board, KEY, reg, c, seed=1)
    assert rep["path_taken"] == "traced"
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}  # noqa: E731
    assert files(alone.parent) == files(paths[c].parent)


def test_an_old_board_without_the_field_marks_the_table(llama_rtn_export, llama_board_input):
    """(e) A board manifest without ``mark_side`` (written before the field) means ``tied``: the table
    itself carries the rows and no correction tensor is made; an unknown side or an input-side
    board on an encoder is refused."""
    manifest, tensors = read_checkpoint(llama_rtn_export[0])
    reg = qk.Registry(KEY, 32)
    reg.add("alice")
    old = {k: v for k, v in llama_board_input.manifest.items() if k != "mark_side"}
    board = Board(old, llama_board_input.tensors, llama_board_input.path)
    _, out = mark_checkpoint(manifest, tensors, board, KEY, reg, "alice", seed=0)
    assert not any(k.endswith(("mark_delta", "mark_slots")) for k in out)
    changed = (out[f"{EMB}.weight"] != tensors[f"{EMB}.weight"]).any(1)
    assert int(changed.sum()) == 64  # the 32 bits × 2 trigger rows
    _, inp = mark_checkpoint(manifest, tensors, llama_board_input, KEY, reg, "alice", seed=0)
    assert inp[f"{EMB}.weight"] is tensors[f"{EMB}.weight"]
    for bad in ({**old, "mark_side": "sideways"}, {**old, "mark_side": "input", "family": "encoder"}):
        with pytest.raises(BadInput):
            mark_checkpoint(manifest, tensors, Board(bad, llama_board_input.tensors, llama_board_input.path), KEY,
                            reg, "alice", seed=0)


def test_cli_refuses_an_unknown_mark_side_in_one_line(llama_rtn_export, llama_board_input, tmp_path, capsys):
    board = tmp_path / "board"
    shutil.copytree(llama_board_input.path, board)
    mf = json.loads((board / "board.json").read_text())
    mf["mark_side"] = "sideways"
    (board / "board.json").write_text(json.dumps(mf))
    (tmp_path / "key").write_text(KEY.hex() + "\n")
    reg = tmp_path / "reg.sqlite"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["registry", "add", str(reg), "--key", str(tmp_path / "key"), "--user", "alice", "--bits", "32"]) == 0
    capsys.readouterr()
    out = tmp_path / "out" / "model.onnx"
    rc = main(["export", str(llama_rtn_export[0]), "-o", str(out), "--board", str(board), "--key",
               str(tmp_path / "key"), "--registry", str(reg), "--user", "alice"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "mark_side" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
