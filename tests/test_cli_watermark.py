"""``quantseal keygen`` / ``registry`` / ``export --board`` / ``verify`` end to end through onnxruntime."""

import os
import sqlite3
import stat

import pytest

from quantseal import keys as qk
from quantseal.registry import open_registry

from cli_run import last_json, run  # tests/cli_run.py

KEY = bytes(range(32))  # tests/conftest.py trains minilm_board under this key


def test_keygen(tmp_path):
    p = tmp_path / "owner.key"
    rc, out, _ = run(["keygen", "-o", p, "--json"])
    assert rc == 0 and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    key = qk.read_key(p)
    assert last_json(out)["key_id"] == qk.key_id(key)
    rc, _, err = run(["keygen", "-o", p])
    assert rc == 2 and "refusing" in err and qk.read_key(p) == key
    assert run(["keygen", "-o", p, "--force"])[0] == 0 and qk.read_key(p) != key


def test_registry_add_list_tamper_wrong_key(tmp_path):
    k, k2, reg = tmp_path / "k", tmp_path / "k2", tmp_path / "reg.db"
    run(["keygen", "-o", k]), run(["keygen", "-o", k2])
    rc, out, _ = run(["registry", "add", reg, "--key", k, "--user", "alice", "--json"])
    assert rc == 0 and last_json(out)["new"] is True
    code = open_registry(reg, qk.read_key(k)).codeword("alice")
    rc, out, _ = run(["registry", "add", reg, "--key", k, "--user", "alice", "--json"])
    assert rc == 0 and last_json(out)["new"] is False and last_json(out)["customers"] == 1
    assert (open_registry(reg, qk.read_key(k)).codeword("alice") == code).all()
    run(["registry", "add", reg, "--key", k, "--user", "bob"])
    rc, out, _ = run(["registry", "list", reg, "--key", k, "--json"])
    assert last_json(out)["customers"] == ["alice", "bob"]
    rc, _, err = run(["registry", "add", reg, "--key", k2, "--user", "carol"])
    assert rc == 2 and "another key" in err
    con = sqlite3.connect(str(reg))
    con.execute("UPDATE registry_customers SET id = 'mallory' WHERE seq = 1")
    con.commit()
    con.close()
    rc, _, err = run(["registry", "list", reg, "--key", k])
    assert rc == 2 and "integrity" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.key").write_text("not a key\n")
    assert run(["registry", "add", tmp_path / "r2.json", "--key", tmp_path / "bad.key", "--user", "x"])[0] == 2


@pytest.mark.slow
def test_export_and_verify_onnx(tmp_path, minilm_board, minilm_rtn_checkpoint, minilm_rtn_onnx):
    import onnx

    k, reg = tmp_path / "owner.key", tmp_path / "reg.db"
    qk.write_key(k, KEY)
    for i in range(12):
        assert run(["registry", "add", reg, "--key", k, "--user", f"c{i}", "--bits", 16])[0] == 0
    a = tmp_path / "a" / "model.onnx"
    rc, out, err = run(["export", minilm_rtn_checkpoint, "-o", a, "--board", minilm_board.path, "--key", k,
                        "--registry", reg, "--user", "c4", "--json"])
    assert rc == 0, err
    assert last_json(out)["marked"] is True
    registry = open_registry(reg, KEY)
    # a second customer in seconds: the board keeps the first traced graph as a template and
    # only the customer's low-rank initialisers change
    b = tmp_path / "b" / "model.onnx"
    rc, out, err = run(["export", minilm_rtn_checkpoint, "-o", b, "--board", minilm_board.path, "--key", k,
                        "--registry", reg, "--user", "c9", "--json"])
    assert rc == 0, err
    assert last_json(out)["path_taken"] == "template"
    ops = last_json(out)["ops"]
    assert ops.get("MatMulNBits", 0) + ops.get("MatMulBnb4", 0) == 36

    verdicts = {}
    for name, path in (("c4", a), ("c9", b), (None, minilm_rtn_onnx)):
        rc, out, err = run(["verify", path, "--board", minilm_board.path, "--key", k, "--registry", reg,
                            "--alpha", "1e-3", "--json"])
        assert rc == 0, err
        verdicts[name] = last_json(out)
    for name in ("c4", "c9"):
        assert verdicts[name]["owner"] == name and verdicts[name]["bit_errors"] == 0
        assert verdicts[name]["queries"] <= 2 * 16  # one trigger per bit and its control
        assert verdicts[name]["owners"] == [name]
    assert verdicts[None]["owner"] is None

    # through the HTTP endpoint (quantseal serve): the same verdict as the file
    import threading

    from quantseal.runtime.server import EmbeddingService, make_server, server_url

    server = make_server(EmbeddingService.from_path(a, provider="cpu"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rc, out, err = run(["verify", server_url(server), "--board", minilm_board.path, "--key", k,
                            "--registry", reg, "--alpha", "1e-3", "--json"])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0, err
    http = last_json(out)
    assert {f: http[f] for f in ("owner", "bits", "bit_errors", "p_value", "queries")} == \
        {f: verdicts["c4"][f] for f in ("owner", "bits", "bit_errors", "p_value", "queries")}
    rc, _, err = run(["verify", server_url(server), "--board", minilm_board.path, "--key", k, "--registry", reg])
    assert rc == 2 and "does not answer" in err

    # two customers' files differ only in the float embedding table that carries the mark (no
    # low-rank branch gives its subspace away); no key material in the file
    ia = {i.name: i.raw_data for i in onnx.load(str(a)).graph.initializer}
    ib = {i.name: i.raw_data for i in onnx.load(str(b)).graph.initializer}
    assert not [n for n in ia if n.endswith((".L1", ".L2"))]
    assert {n for n in ia if ia[n] != ib[n]} == {"embeddings.word_embeddings.weight"}
    blob = a.read_bytes()
    for secret in (KEY, KEY.hex().encode(), qk.bits_to_hex(registry.codeword("c4")).encode(),
                   qk.key_id(KEY).encode(), minilm_board.manifest["trigger_digest"].encode()):
        assert secret not in blob
    meta = {p.key: p.value for p in onnx.load(str(a)).metadata_props}
    assert not any("c4" in v or "board" in v or "watermark" in v for v in meta.values()), meta
    # bad inputs: one line, exit 2
    rc, _, err = run(["verify", tmp_path / "missing.onnx", "--board", minilm_board.path, "--key", k, "--registry", reg])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    rc, _, err = run(["verify", tmp_path / "junk.onnx", "--board", minilm_board.path, "--key", k, "--registry", reg])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    rc, _, err = run(["export", minilm_rtn_checkpoint, "-o", tmp_path / "x.onnx", "--board", minilm_board.path,
                      "--key", k, "--registry", reg, "--user", "nobody"])
    assert rc == 2 and "not in the registry" in err
    rc, _, err = run(["export", minilm_rtn_checkpoint, "-o", tmp_path / "x.onnx", "--board", minilm_board.path])
    assert rc == 2 and "--user" in err


@pytest.mark.slow
def test_decoder_board_export_verify(tmp_path, llama_rtn_export, llama_board):
    """A LLaMA checkpoint: ``board train`` works on it; a customer's ``export --board`` is
    attributed by ``verify FILE`` from next-token logits; the unmarked export is not; bad
    suspects are one line and exit 2."""
    ck, unmarked = llama_rtn_export
    key, reg = tmp_path / "owner.key", tmp_path / "reg.db"
    qk.write_key(key, KEY)
    rc, out, err = run(["board", "train", ck, "-o", tmp_path / "small", "--key", key, "--bits", "8", "--steps", "10",
                        "--triggers-per-bit", "2", "--json"])
    assert rc == 0, err
    assert last_json(out)["bits"] == 8 and qk.read_board_manifest(tmp_path / "small")["family"] == "decoder"
    for user in ("alice", "bob"):
        assert run(["registry", "add", reg, "--key", key, "--user", user, "--bits", "32"])[0] == 0
    onnx_path = tmp_path / "alice" / "model.onnx"
    rc, out, err = run(["export", ck, "-o", onnx_path, "--board", llama_board.path, "--key", key, "--registry", reg,
                        "--user", "alice", "--json"])
    assert rc == 0, err
    rc, out, err = run(["verify", onnx_path, "--board", llama_board.path, "--key", key, "--registry", reg, "--json"])
    res = last_json(out)
    assert rc == 0 and res["owner"] == "alice" and res["bit_errors"] == 0 and res["queries"] <= 2 * 32
    rc, out, _ = run(["verify", unmarked["path"], "--board", llama_board.path, "--key", key, "--registry", reg, "--json"])
    assert rc == 0 and last_json(out)["owner"] is None
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for suspect in (tmp_path / "junk.onnx", tmp_path / "missing.onnx", "http://127.0.0.1:9"):
        rc, _, err = run(["verify", suspect, "--board", llama_board.path, "--key", key, "--registry", reg])
        assert rc == 2 and len(err.strip().splitlines()) == 1, (suspect, err)


def test_board_train_readout_flags_refused_cleanly(tmp_path, llama_rtn_export, minilm_rtn_checkpoint):
    """``board train --readout/--chat-template`` misuse: one line on stderr, exit 2, no board
    folder: a missing or template-less file, a chat template with the diff readout, top1 on an
    encoder, a non-positive margin."""
    key = tmp_path / "k"
    qk.write_key(key, bytes(range(32)))
    ck = llama_rtn_export[0]
    (tmp_path / "cfg.json").write_text('{"bos_token": "<s>"}')
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    out = tmp_path / "board"
    for ckpt, extra, says in (
            (ck, ["--readout", "top1", "--chat-template", tmp_path / "missing.jinja"], "no such chat template"),
            (ck, ["--readout", "top1", "--chat-template", tmp_path / "cfg.json"], "no chat_template"),
            (ck, ["--readout", "top1", "--chat-template", "auto"], "no chat template"),
            (ck, ["--chat-template", tmp_path / "t.jinja"], "--readout top1"),
            (ck, ["--readout", "top1", "--margin", "0"], "--margin must be"),
            (minilm_rtn_checkpoint, ["--readout", "top1"], "decoder boards"),
            (minilm_rtn_checkpoint, ["--mark-side", "input"], "decoder boards"),
            (ck, ["--mark-side", "head"], "--mark-side")):
        rc, _, err = run(["board", "train", ckpt, "-o", out, "--key", key, "--bits", "8", "--steps", "1", *extra])
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()


def test_board_train_autocast_flag(tmp_path, llama_rtn_export):
    """``board train --autocast bf16`` trains a decoder board under bfloat16 autocast: the manifest
    records it, and the board differs from the float32 one (same seed) only by bfloat16 rounding —
    its coefficients point the same way (cosine > 0.95) without being bit-identical.  An unknown
    precision is one line on stderr, exit 2, no board folder."""
    import torch

    from quantseal.compress.markboard import load_board

    ck = llama_rtn_export[0]
    key = tmp_path / "k"
    qk.write_key(key, KEY)
    boards = {}
    for mode in ("none", "bf16"):
        out = tmp_path / mode
        rc, _, err = run(["board", "train", ck, "-o", out, "--key", key, "--bits", "8", "--triggers-per-bit", "1",
                          "--steps", "3", "--autocast", mode, "--json"])
        assert rc == 0, err
        boards[mode] = load_board(out)
    assert boards["none"].manifest["training"]["autocast"] is None
    assert boards["bf16"].manifest["training"]["autocast"] == "bf16"
    c32, c16 = (torch.cat([b.tensors["C0"].reshape(-1), b.tensors["C1"].reshape(-1)]) for b in boards.values())
    assert not torch.equal(c32, c16)
    assert float(torch.nn.functional.cosine_similarity(c32, c16, dim=0)) > 0.95
    rc, _, err = run(["board", "train", ck, "-o", tmp_path / "fp16", "--key", key, "--bits", "8", "--steps", "1",
                      "--autocast", "fp16"])
    assert rc == 2 and "--autocast" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "fp16").exists()


def test_board_train_mark_side_flag(tmp_path, llama_rtn_export):
    """``board train --mark-side tied|input`` reaches the manifest (a tied decoder's default is
    input), and the two layouts train differently from the same seed (the tied one keeps the
    head terms)."""
    import torch

    from quantseal.compress.markboard import load_board

    ck = llama_rtn_export[0]
    key = tmp_path / "k"
    qk.write_key(key, KEY)
    boards = {}
    for side in ("default", "tied", "input"):
        out = tmp_path / side
        rc, _, err = run(["board", "train", ck, "-o", out, "--key", key, "--bits", "8", "--triggers-per-bit", "1",
                          "--steps", "3", *([] if side == "default" else ["--mark-side", side]), "--json"])
        assert rc == 0, err
        boards[side] = load_board(out)
    assert [boards[s].manifest["mark_side"] for s in boards] == ["input", "tied", "input"]
    assert torch.equal(boards["default"].tensors["C1"], boards["input"].tensors["C1"])
    assert not torch.equal(boards["tied"].tensors["C1"], boards["input"].tensors["C1"])
    assert boards["input"].manifest["training"]["head_kl_random_customer"] == 0.0
    assert boards["tied"].manifest["training"]["head_kl_random_customer"] > 0.0
