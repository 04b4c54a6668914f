"""Per-customer marking (quantseal/export/watermark.py): select, fold, obfuscate; decoded back
black-box through quantseal/runtime/verify.py on the real compressed MiniLM."""


import numpy as np
import pytest
import torch
from safetensors.torch import save

from quantseal import keys as qk
from quantseal.checkpoint import entry_bytes, load_compressed, read_checkpoint, write_checkpoint
from quantseal.compress.markboard import Board, tensors_fingerprint
from quantseal.compress.qlinear import CompressedEmbedding, set_submodule
from quantseal.errors import BadInput
from quantseal.export.watermark import mark_checkpoint, obfuscate_pair
from quantseal.models import encode
from quantseal.quality import embed_texts, embedding_error
from quantseal.runtime.verify import verify
from quantseal.text import TextTokenizer, pydoc_sentences

KEY = bytes(range(32))  # tests/conftest.py trains minilm_board under this key
KEY2 = bytes(range(100, 132))
EMB = "embeddings.word_embeddings"
ALPHA = 1e-3  # 16-bit test board, 10 customers: a perfect match has p = 10 · 2^-16 ≈ 1.5e-4


def torch_embed_fn(model):
    @torch.no_grad()
    def embed(batch):
        return encode(model, {k: torch.from_numpy(v) for k, v in batch.items()}).numpy()

    return embed


def with_embedding(model, tensors):
    """``model`` with its token embedding replaced by the (marked) stored one: E + L1 L2."""
    w = tensors[f"{EMB}.weight"].float()
    l1, l2 = tensors.get(f"{EMB}.L1"), tensors.get(f"{EMB}.L2")
    set_submodule(model, EMB, CompressedEmbedding(w, None if l1 is None else l1.float(),
                                                  None if l2 is None else l2.float(), 0))
    return model


def board_for_key(board: Board, key: bytes) -> Board:
    """The same board tensors re-keyed: another owner's triggers (its branches untrained for them)."""
    m = dict(board.manifest)
    ts = qk.derive_triggers(key, board.tokenizer(), m["bits"], m["hosts"], m["triggers_per_bit"],
                            m["tokens_per_bit"], m["hidden"])
    m.update(key_id=qk.key_id(key), trigger_digest=ts.digest())
    return Board(m, board.tensors, board.path)


@pytest.fixture(scope="module")
def setup(minilm_rtn_checkpoint, minilm_board):
    manifest, tensors = read_checkpoint(minilm_rtn_checkpoint)
    reg = qk.Registry(KEY, 16)
    for i in range(10):
        reg.add(f"customer-{i:02d}")
    model, _, _ = load_compressed(minilm_rtn_checkpoint)
    tok = TextTokenizer(minilm_rtn_checkpoint)
    return manifest, tensors, reg, model, tok


@pytest.mark.slow
def test_every_customer_decodes_to_own_codeword(setup, minilm_board):
    manifest, tensors, reg, model, tok = setup
    for cust in reg.customers():
        _, marked = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, cust)
        res = verify(torch_embed_fn(with_embedding(model, marked)), KEY, reg, minilm_board.manifest, tok, alpha=ALPHA)
        assert res["bit_errors"] == 0, (cust, res)
        assert res["owner"] == cust and res["bits"] == "".join(map(str, reg.codeword(cust)))
        assert res["p_value"] == 10 * 2.0 ** -16
        assert res["min_abs_statistic"] > 0.05  # a clear margin, not a coin flip


@pytest.mark.slow
def test_innocent_models_are_not_claimed(setup, minilm_board):
    manifest, tensors, reg, model, tok = setup
    unmarked = verify(torch_embed_fn(with_embedding(model, tensors)), KEY, reg, minilm_board.manifest, tok, alpha=ALPHA)
    assert unmarked["owner"] is None and unmarked["p_value"] >= ALPHA
    # marked by another owner (KEY2: other trigger tokens), read with KEY
    other = board_for_key(minilm_board, KEY2)
    reg2 = qk.Registry(KEY2, 16)
    reg2.add("theirs")
    _, marked2 = mark_checkpoint(manifest, tensors, other, KEY2, reg2, "theirs")
    res = verify(torch_embed_fn(with_embedding(model, marked2)), KEY, reg, minilm_board.manifest, tok, alpha=ALPHA)
    assert res["owner"] is None
    # a model marked with KEY, read by the owner of KEY2, is not theirs either
    reg2b = qk.Registry(KEY2, 16)
    for i in range(10):
        reg2b.add(f"customer-{i:02d}")
    _, marked = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "customer-03")
    res2 = verify(torch_embed_fn(with_embedding(model, marked)), KEY2, reg2b, other.manifest, tok, alpha=ALPHA)
    assert res2["owner"] is None


@pytest.mark.slow
def test_fidelity_cost_on_held_out_text(setup, minilm_board):
    manifest, tensors, reg, model, tok = setup
    held_out = pydoc_sentences("evaluation")[:120]
    ref = embed_texts(with_embedding(model, tensors), tok, held_out)
    _, marked = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "customer-01")
    test = embed_texts(with_embedding(model, marked), tok, held_out)
    assert embedding_error(ref, test) <= 0.002
    # ... while the mark does move the trigger sentences
    ts = qk.triggers_of(minilm_board.manifest, KEY, tok)
    trig = [t.text for t in ts.triggers[0]]
    assert embedding_error(embed_texts(with_embedding(model, tensors), tok, trig),
                           embed_texts(with_embedding(model, marked), tok, trig)) > 1e-3


@pytest.mark.slow
def test_mark_lives_in_the_float_table_and_outputs_hold_no_secrets(setup, minilm_board):
    """A float table takes the mark itself (export/watermark.py: a low-rank branch would give the
    mark's subspace away): the trigger rows of E' are E + B·A, every other row is E bit for bit,
    and there is no branch whose row space could point at the triggers."""
    manifest, tensors, reg, model, tok = setup
    m_a, t_a = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "customer-00")
    m_b, t_b = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "customer-01")
    _, t_a2 = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "customer-00")
    assert not any(k.endswith((".L1", ".L2")) for k in t_a) and m_a.matrices[EMB].rank == 0
    assert save(t_a) == save(t_a2)  # the same customer gets the same bytes
    ts = qk.triggers_of(minilm_board.manifest, KEY, tok)
    flat = torch.from_numpy(ts.tokens.reshape(-1))
    base = tensors[f"{EMB}.weight"]
    rows = minilm_board.branch_rows(reg.codeword("customer-00")).double() @ minilm_board.tensors["A"].double()
    table = t_a[f"{EMB}.weight"]
    assert table.dtype == base.dtype
    torch.testing.assert_close(table[flat].double() - base[flat].double(), rows, atol=1e-6, rtol=0)
    others = torch.ones(base.shape[0], dtype=torch.bool)
    others[flat] = False
    assert torch.equal(table[others], base[others])  # other tokens: the plain table, bit for bit
    # two customers' tables differ exactly on the rows of the bits where their codewords differ
    k = minilm_board.manifest["tokens_per_bit"]
    diff_bits = np.flatnonzero(reg.codeword("customer-00") != reg.codeword("customer-01"))
    differ = torch.nonzero((t_a[f"{EMB}.weight"] != t_b[f"{EMB}.weight"]).any(1)).flatten()
    assert set(differ.tolist()) == set(ts.tokens[diff_bits].reshape(-1).tolist())
    assert len(diff_bits) * k >= minilm_board.manifest["bits"] // 4 * k  # registry min distance n/4
    # no key, codeword, customer id or board in the output
    blob = save(t_a) + m_a.to_json().encode()
    code_hex = qk.bits_to_hex(reg.codeword("customer-00"))
    for secret in (KEY, KEY.hex().encode(), b"customer-00", code_hex.encode(), qk.key_id(KEY).encode(),
                   minilm_board.manifest["trigger_digest"].encode()):
        assert secret not in blob
    assert "watermark" not in m_a.to_json() and "board" not in m_a.to_json()


@pytest.mark.slow
def test_marked_checkpoint_roundtrip(setup, minilm_board, minilm_rtn_checkpoint, tmp_path):
    manifest, tensors, reg, model, tok = setup
    m2, t2 = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "customer-07")
    assert EMB not in manifest.matrices  # input untouched
    e = m2.matrices[EMB]
    assert (e.kind, e.format, e.rank, e.shape) == ("embedding", "fp32", 0, [30522, 384])
    assert all(x.bytes == entry_bytes(n, t2) for n, x in m2.matrices.items())
    size = sum(v.numel() * v.element_size() for v in t2.values())
    assert size == sum(v.numel() * v.element_size() for v in tensors.values())  # the mark costs no bytes
    assert m2.budget["tensor_bytes"] == manifest.budget["tensor_bytes"]
    out = write_checkpoint(tmp_path / "ck", m2, t2, minilm_rtn_checkpoint)
    loaded, _, _ = load_compressed(out)
    res = verify(torch_embed_fn(loaded), KEY, reg, minilm_board.manifest, tok, alpha=ALPHA)
    assert res["owner"] == "customer-07" and res["bit_errors"] == 0


def test_obfuscate_pair_preserves_product_exactly():
    rng = np.random.default_rng(0)
    l1, l2 = rng.standard_normal((200, 12)), rng.standard_normal((12, 70))
    y1, y2 = obfuscate_pair(l1, l2, np.random.default_rng(1))
    z1, _ = obfuscate_pair(l1, l2, np.random.default_rng(2))
    np.testing.assert_allclose(y1 @ y2, l1 @ l2, rtol=0, atol=1e-11)
    assert not np.allclose(y1, l1) and not np.allclose(y1, z1)
    np.testing.assert_allclose(np.linalg.norm(y1, axis=0), np.linalg.norm(y2, axis=1), rtol=1e-12)  # balanced


@pytest.mark.slow
def test_existing_lowrank_branches_are_kept_and_remixed(setup, minilm_board):
    manifest, tensors, reg, model, tok = setup
    import copy

    g = torch.Generator().manual_seed(0)
    lin = "encoder.layer.0.attention.self.query"
    t = dict(tensors)
    t[f"{lin}.L1"] = (0.05 * torch.randn(384, 8, generator=g)).half()
    t[f"{lin}.L2"] = (0.05 * torch.randn(8, 384, generator=g)).half()
    t[f"{EMB}.L1"] = (0.05 * torch.randn(30522, 4, generator=g)).half()
    t[f"{EMB}.L2"] = (0.05 * torch.randn(4, 384, generator=g)).half()
    m = copy.deepcopy(manifest)
    m.matrices[lin].rank = 8
    from quantseal.checkpoint import MatrixEntry

    m.matrices[EMB] = MatrixEntry("fp32", 4, [30522, 384], 0.0, entry_bytes(EMB, t), "embedding")
    board = Board({**minilm_board.manifest, "source_fingerprint": tensors_fingerprint(t)},
                  minilm_board.tensors, minilm_board.path)
    m2, t2 = mark_checkpoint(m, t, board, KEY, reg, "customer-02")
    assert m2.matrices[lin].rank == 8 and m2.matrices[EMB].rank == 4  # the mark went into the table
    assert not torch.equal(t2[f"{EMB}.L1"], t[f"{EMB}.L1"])  # the table's own branch is remixed
    before = t[f"{lin}.L1"].double() @ t[f"{lin}.L2"].double()
    after = t2[f"{lin}.L1"].double() @ t2[f"{lin}.L2"].double()
    assert not torch.equal(t2[f"{lin}.L1"], t[f"{lin}.L1"])
    assert (after - before).abs().max() < 1e-3 * before.abs().max()
    ts = qk.triggers_of(board.manifest, KEY, tok)
    mark = torch.zeros(30522, 384, dtype=torch.float64)
    mark[torch.from_numpy(ts.tokens.reshape(-1))] = (
        board.branch_rows(reg.codeword("customer-02")).double() @ board.tensors["A"].double())
    # effective tables
    want = t[f"{EMB}.weight"].double() + t[f"{EMB}.L1"].double() @ t[f"{EMB}.L2"].double() + mark
    got = t2[f"{EMB}.weight"].double() + t2[f"{EMB}.L1"].double() @ t2[f"{EMB}.L2"].double()
    assert (got - want).abs().max() < 2e-3 * mark.abs().max()


@pytest.mark.slow
def test_wrong_board_customer_or_key_refused(setup, minilm_board):
    manifest, tensors, reg, model, tok = setup
    t = dict(tensors)
    t["embeddings.LayerNorm.weight"] = t["embeddings.LayerNorm.weight"] + 1
    with pytest.raises(BadInput, match="another checkpoint"):
        mark_checkpoint(manifest, t, minilm_board, KEY, reg, "customer-00")
    with pytest.raises(BadInput, match="not in the registry"):
        mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "nobody")
    with pytest.raises(BadInput, match="key"):
        mark_checkpoint(manifest, tensors, minilm_board, KEY2, qk.Registry(KEY2, 16), "x")
    with pytest.raises(BadInput, match="bits"):
        r64 = qk.Registry(KEY, 64)
        r64.add("customer-00")
        mark_checkpoint(manifest, tensors, minilm_board, KEY, r64, "customer-00")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8_b64", "int4_b32", "int4f_b32"])
def test_a_quantised_table_takes_the_mark_by_requantised_rows(setup, minilm_board, minilm_rtn_checkpoint, tmp_path,
                                                              fmt):
    """A quantised table (``--budget-mb``): only the trigger rows' codes and scales change, to the
    requantisation of dequant(Q) + B·A (no low-rank branch); exported (traced and swapped into
    the template) every customer is attributed through onnxruntime."""
    import copy

    from quantseal.checkpoint import MatrixEntry, matrix_tensors
    from quantseal.compress.formats import FormatSpec
    from quantseal.compress.markboard import save_board
    from quantseal.compress.quantizers import dequantize, quantize
    from quantseal.export.watermark import export_marked, requantised_rows
    from quantseal.runtime.verify import onnx_embed_fn

    manifest, tensors, reg, model, tok = setup
    spec = FormatSpec.parse(fmt)
    t = {k: v for k, v in tensors.items() if k != f"{EMB}.weight"}
    t.update(matrix_tensors(EMB, spec, quantize(tensors[f"{EMB}.weight"].float(), spec), None, None, None))
    m = copy.deepcopy(manifest)
    m.matrices[EMB] = MatrixEntry(spec.name, 0, [30522, 384], 0.0, entry_bytes(EMB, t), "embedding")
    ck = write_checkpoint(tmp_path / "ck", m, t, minilm_rtn_checkpoint)
    board = Board({**minilm_board.manifest, "source_fingerprint": tensors_fingerprint(t)}, minilm_board.tensors)
    board_dir = save_board(board, tmp_path / "board", ck)

    m2, t2 = mark_checkpoint(m, t, board, KEY, reg, "customer-03")
    assert m2.matrices[EMB].rank == 0 and not any(k.endswith((".L1", ".L2")) for k in t2)
    assert m2.matrices[EMB].bytes == m.matrices[EMB].bytes
    ts = qk.triggers_of(board.manifest, KEY, tok)
    flat = torch.from_numpy(ts.tokens.reshape(-1))
    mark = board.branch_rows(reg.codeword("customer-03")).double() @ board.tensors["A"].double()
    from quantseal.checkpoint import stored_quantized

    before, after = stored_quantized(EMB, m.matrices[EMB], t), stored_quantized(EMB, m2.matrices[EMB], t2)
    others = torch.ones(30522, dtype=torch.bool)
    others[flat] = False
    assert torch.equal(after.codes[others], before.codes[others]) and torch.equal(after.scales[others], before.scales[others])
    # the trigger rows: exactly the requantisation of dequant(Q) + mark (reference: the whole table)
    full = quantize(dequantize(before) + torch.zeros(30522, 384).index_put((flat,), mark.float()), spec)
    assert torch.equal(after.codes[flat], full.codes[flat]) and torch.equal(after.scales[flat], full.scales[flat])
    if spec.kind == "intf":  # int4f: the float block offsets follow the same rows (ŵ = s·q + m)
        assert torch.equal(after.offsets[others], before.offsets[others])
        assert torch.equal(after.offsets[flat], full.offsets[flat])
    assert requantised_rows(EMB, m.matrices[EMB], t, flat, mark).keys() == {k for k in t if k.startswith(EMB + ".")}

    for i, c in enumerate(("customer-03", "customer-04")):  # traced, then swapped into the template
        out = tmp_path / c / "model.onnx"
        rep = export_marked(ck, out, board_dir, KEY, reg, c, seed=i)
        assert rep["path_taken"] == ("traced" if i == 0 else "template")
        res = verify(onnx_embed_fn(out, provider="cpu"), KEY, reg, board.manifest, tok, alpha=ALPHA)
        assert res["owner"] == c and res["bit_errors"] == 0, res


@pytest.mark.slow
def test_twenty_customers_exported_through_onnxruntime_decode_exactly(minilm_rtn_checkpoint, minilm_board, tmp_path):
    """The issue's acceptance test: twenty customers, each exported (`export_marked`: traced once,
    then swapped into the template) and verified black-box through onnxruntime."""
    import shutil

    from quantseal.export.watermark import export_marked
    from quantseal.runtime.verify import onnx_embed_fn

    reg = qk.Registry(KEY, 16)
    customers = [f"tw-{i:02d}" for i in range(20)]
    for c in customers:
        reg.add(c)
    tok = TextTokenizer(minilm_rtn_checkpoint)
    for i, c in enumerate(customers):
        out = tmp_path / c / "model.onnx"
        export_marked(minilm_rtn_checkpoint, out, minilm_board.path, KEY, reg, c, seed=i)
        res = verify(onnx_embed_fn(out, provider="cpu"), KEY, reg, minilm_board.manifest, tok, alpha=ALPHA)
        assert res["owner"] == c and res["bit_errors"] == 0, (c, res)
        assert res["p_value"] == pytest.approx(20 * 2.0 ** -16)
        shutil.rmtree(out.parent)
