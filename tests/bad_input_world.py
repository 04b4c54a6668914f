"""The inputs of the bad-input matrix (tests/test_bad_inputs.py), built once per module in one folder
``W`` from the tiny seeded BERT of ``tests/conftest.py``: good inputs made by the real CLI, and a
damaged copy of each for every class of bad input (missing, a folder for a file and a file for a
folder, 0 bytes, random bytes, truncated, non-UTF-8, a lying manifest re-hashed so only the field
checks can catch it, NaN/Inf, a wrong key, tampered registries).

``paths(W)`` names them all for the case table (tests/bad_input_cases.py); every name is a
placeholder ``{name}`` there.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantseal import checkpoint as ckpt
from quantseal.integrity import file_records
from quantseal.keys import Registry, write_key

from cli_run import run

KEY2 = bytes(range(100, 132))
RANDOM = bytes((i * 97 + 13) % 256 for i in range(4096))  # fixed "random" bytes: neither UTF-8 nor JSON
LATIN1 = "café crème\n".encode("latin-1")


def _ok(argv):
    rc, out, err = run(argv)
    assert rc == 0, (argv, err)
    return out


def _damage(folder: Path, name: str, how: str) -> None:
    """Replace ``folder/name`` by: 0 bytes, random bytes, its first half, non-UTF-8 text, a folder,
    or nothing."""
    f = folder / name
    data = f.read_bytes() if f.is_file() else b""
    f.unlink(missing_ok=True)
    if how == "zero":
        f.write_bytes(b"")
    elif how == "random":
        f.write_bytes(RANDOM)
    elif how == "trunc":
        f.write_bytes(data[: len(data) // 2])
    elif how == "nonutf8":
        f.write_bytes(LATIN1)
    elif how == "dir":
        f.mkdir()
    elif how != "missing":
        raise ValueError(how)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _rehash(ck: Path, edit_tensors=None, edit_manifest=None, manifest_name=ckpt.MANIFEST,
            weights=ckpt.WEIGHTS) -> Path:
    """Edit a checkpoint's (or board's) tensors and/or manifest, then record the new hashes: a
    consistent forgery that only the field and value checks can catch."""
    w = ck / weights
    if edit_tensors:
        t = load_file(str(w))
        edit_tensors(t)
        save_file(t, str(w), metadata={"format": "pt"})
    d = json.loads((ck / manifest_name).read_text())
    if edit_manifest:
        edit_manifest(d)
    if d.get("files") and isinstance(d["files"], dict):
        d["files"] = file_records(ck, d["files"])
    (ck / manifest_name).write_text(json.dumps(d))
    return ck


def _first_matrix(d: dict) -> str:
    return sorted(k for k, e in d["matrices"].items() if e["kind"] == "linear")[0]


def _lie(field: str):
    def edit(d):
        name = _first_matrix(d)
        e = d["matrices"][name]
        if field == "shape":
            e["shape"] = [e["shape"][0], e["shape"][1] * 2]
        elif field == "format":
            e["format"] = "int8_b32" if not e["format"].startswith("int8") else "int2_b32"
        elif field == "format_unknown":
            e["format"] = "int5_b64"
        elif field == "bytes":
            e["bytes"] += 1
        elif field == "rank":
            e["rank"] += 2
        elif field == "sha256":
            d["files"][ckpt.WEIGHTS]["sha256"] = "0" * 64
        elif field == "schema":
            d["schema_version"] = 99
        elif field == "unknown_field":
            e["colour"] = "red"
        elif field == "missing_matrix_field":
            del e["format"]
    return edit


def build(W: Path, tiny_bert_dir: Path) -> dict[str, Path | str]:
    """Make every input under ``W``; returns ``paths(W)``."""
    torch.set_num_threads(1)
    W.mkdir(parents=True, exist_ok=True)
    model = _copy(tiny_bert_dir, W / "model")
    ck, board, onnx = W / "ck", W / "board", W / "onnx" / "model.onnx"
    key, key2 = W / "key", W / "key2"
    _ok(["compress", model, "-o", ck, "--budget", "4.5", "--method", "rtn", "--workers", "1"])
    _ok(["export", ck, "-o", onnx])
    write_key(key, bytes(range(32)))
    write_key(key2, KEY2)
    for c in ("alice", "bob"):
        _ok(["registry", "add", W / "reg.db", "--key", key, "--user", c, "--bits", "16"])
    _ok(["registry", "add", W / "reg_key2.db", "--key", key2, "--user", "alice", "--bits", "16"])
    _ok(["registry", "add", W / "reg_removed.db", "--key", key, "--user", "alice", "--bits", "16"])
    _ok(["registry", "remove", W / "reg_removed.db", "--key", key, "--user", "alice"])
    _ok(["board", "train", ck, "-o", board, "--key", key, "--bits", "16", "--steps", "2", "--triggers-per-bit", "2"])
    (W / "customers.txt").write_text("alice\nbob\n")
    _ok(["export-batch", ck, "--customers", W / "customers.txt", "-o", W / "batch0", "--board", board, "--key", key,
         "--registry", W / "reg.db", "--workers", "1", "--seed", "0"])  # leaves the board's ONNX template
    shutil.rmtree(W / "batch0")
    marked = W / "marked" / "model.onnx"
    _ok(["export", ck, "-o", marked, "--board", board, "--key", key, "--registry", W / "reg.db", "--user", "alice",
         "--seed", "1"])

    # plain bad files and folders
    (W / "zero.bin").write_bytes(b"")
    (W / "random.bin").write_bytes(RANDOM)
    (W / "latin1.txt").write_bytes(LATIN1)
    (W / "blank.txt").write_text("\n  \n\n")
    (W / "emptydir").mkdir()
    (W / "dir.onnx").mkdir()
    (W / "texts.txt").write_text("a first text\na second text\n")
    (W / "token.txt").write_text("s3cret-token\n")
    (W / "token_ctrl.txt").write_bytes(b"abc\x1bdef\n")
    reg_bytes = (W / "reg.db").read_bytes()
    (W / "reg_trunc.db").write_bytes(reg_bytes[: len(reg_bytes) // 2])
    (W / "reg_random.db").write_bytes(b"SQLite format 3\x00" + RANDOM)
    _copy_file(W / "reg.db", W / "reg_tampered.db")
    con = sqlite3.connect(W / "reg_tampered.db")
    con.execute("UPDATE registry_customers SET codeword = 'ffff' WHERE id = 'bob'")
    con.commit()
    con.close()
    _copy_file(W / "reg.db", W / "reg_deleted.db")
    con = sqlite3.connect(W / "reg_deleted.db")
    con.execute("DELETE FROM registry_customers WHERE id = 'bob'")
    con.commit()
    con.close()
    for p in W.glob("reg_*.db-*"):  # no WAL leftovers from the edits
        p.unlink()
    legacy = Registry(bytes(range(32)), 16, path=W / "legacy.json")
    legacy.add("carol")
    legacy.save()
    d = json.loads((W / "legacy.json").read_text())
    d["customers"][0][0] = "mallory"
    (W / "legacy_tampered.json").write_text(json.dumps(d))
    hostile = Registry(bytes(range(32)), 16, path=W / "legacy_hostile.json")
    hostile.add("../evil")  # an id the database refuses: import must refuse it, naming it
    hostile.save()
    for name, text in (("slash", "alice\n../x\n"), ("dup", "alice\nalice\n"), ("unknown", "alice\nzed\n"),
                       ("ctrl", "alice\na\x1bb\n"), ("dotdot", "..\n"), ("sql", "x'; DROP TABLE t; --\n")):
        (W / f"cust_{name}.txt").write_text(text)
    (W / "key_short").write_text("00ff\n")
    (W / "key_latin1").write_bytes(LATIN1)

    # source model folders
    for how in ("missing", "zero", "random", "trunc", "nonutf8", "dir"):
        _damage(_copy(model, W / f"model_config_{how}"), "config.json", how)
    for how in ("zero", "random", "trunc"):
        _damage(_copy(model, W / f"model_weights_{how}"), "model.safetensors", how)
    _copy(model, W / "model_unknown_type")
    cfg = json.loads((model / "config.json").read_text())
    (W / "model_unknown_type" / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    for name, edit in (("nan", lambda t: t["embeddings.word_embeddings.weight"][5].fill_(float("nan"))),
                       ("inf", lambda t: t["encoder.layer.0.attention.self.query.weight"][0].fill_(float("inf"))),
                       ("missing_weight", lambda t: t.pop("encoder.layer.1.output.dense.weight"))):
        m = _copy(model, W / f"model_{name}")
        t = load_file(str(m / "model.safetensors"))
        edit(t)
        save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})

    # checkpoints
    for how in ("missing", "zero", "random", "trunc", "dir"):
        _damage(_copy(ck, W / f"ck_weights_{how}"), ckpt.WEIGHTS, how)
    for how in ("missing", "zero", "random", "trunc", "nonutf8", "dir"):
        _damage(_copy(ck, W / f"ck_manifest_{how}"), ckpt.MANIFEST, how)
    for how in ("random", "zero", "missing"):
        _damage(_copy(ck, W / f"ck_config_{how}"), "config.json", how)
    _damage(_copy(ck, W / "ck_tokenizer_random"), "tokenizer.json", "random")
    flip = _copy(ck, W / "ck_flip")
    data = bytearray((flip / ckpt.WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (flip / ckpt.WEIGHTS).write_bytes(bytes(data))
    for field in ("shape", "format", "format_unknown", "bytes", "rank", "sha256", "schema", "unknown_field",
                  "missing_matrix_field"):
        lie = _rehash(_copy(ck, W / f"ck_lie_{field}"), edit_manifest=None if field == "sha256" else _lie(field))
        if field == "sha256":  # the recorded hash itself lies
            d = json.loads((lie / ckpt.MANIFEST).read_text())
            _lie(field)(d)
            (lie / ckpt.MANIFEST).write_text(json.dumps(d))
    d = json.loads((ck / ckpt.MANIFEST).read_text())
    first = _first_matrix(d)
    for name, edit in (
            ("missing_tensor", lambda t: t.pop(f"{first}.scales")),
            ("nan_embedding", lambda t: t["embeddings.word_embeddings.weight"][7].fill_(float("nan"))),
            ("inf_scales", lambda t: t[f"{first}.scales"].view(-1)[3:4].fill_(float("inf"))),
            ("nan_layernorm", lambda t: t["embeddings.LayerNorm.weight"][1:2].fill_(float("nan")))):
        _rehash(_copy(ck, W / f"ck_{name}"), edit_tensors=edit)

    # boards
    from quantseal.compress.markboard import BOARD_WEIGHTS
    from quantseal.keys import BOARD_MANIFEST

    for how in ("missing", "zero", "random", "trunc"):
        _damage(_copy(board, W / f"board_weights_{how}"), BOARD_WEIGHTS, how)
    for how in ("missing", "zero", "random", "nonutf8"):
        _damage(_copy(board, W / f"board_manifest_{how}"), BOARD_MANIFEST, how)
    _rehash(_copy(board, W / "board_nan"), edit_tensors=lambda t: t["C0"][0].fill_(float("nan")),
            manifest_name=BOARD_MANIFEST, weights=BOARD_WEIGHTS)
    _rehash(_copy(board, W / "board_bits"), edit_manifest=lambda d: d.update(bits=24),
            manifest_name=BOARD_MANIFEST, weights=BOARD_WEIGHTS)

    # ONNX files (each with its tokenizer beside it)
    for how in ("zero", "random", "trunc"):
        folder = _copy(onnx.parent, W / f"onnx_{how}")
        _damage(folder, "model.onnx", how)
    _damage(_copy(onnx.parent, W / "onnx_tokenizer_random"), "tokenizer.json", "random")
    _damage(_copy(onnx.parent, W / "onnx_no_tokenizer"), "tokenizer.json", "missing")
    os.sync()
    return paths(W)


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


def paths(W: Path) -> dict[str, str]:
    """Placeholder name → path (as a string) of every input under ``W`` (top-level entries, and
    ``onnx*``/``marked`` folders' model files as ``NAME_model``)."""
    out = {}
    for p in sorted(W.iterdir()):
        name = p.name.replace(".", "_").replace("-", "_")
        out[name] = str(p)
        if (p / "model.onnx").exists():
            out[f"{name}_model"] = str(p / "model.onnx")
    out["W"] = str(W)
    out["nope"] = str(W / "no-such-path")
    return out
