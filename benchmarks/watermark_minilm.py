"""Per-customer watermark (Hot-Swap MarkBoard) on the bundled all-MiniLM-L6-v2, in one run.

One compressed model (``quantseal compress --budget 4.5 --method rtn``), one 64-bit board trained
once under key A, then (DESIGN §7, issue 4):

1. **attribution**: a registry of N customers (default 100); each customer's ONNX file is made by
   the fast path (``mark_checkpoint`` + ``swap_into_template`` into one exported graph) and verified
   black-box through onnxruntime at alpha = 1e-6; the slow path (``export_marked``: trace + rewrite)
   is timed on a few customers;
2. **false claims** on innocent models: float32 ONNX, the unmarked compressed model, other budgets
   and methods, onnxruntime's own INT4 quantiser, int8/fp16 versions of the float32 model, and
   other keys (a model marked under key B read with key A's board and registry, and vice versa;
   key B's board is key A's board re-keyed: same tensors, B's trigger tokens);
3. **fidelity cost**: embedding error (1 − mean cosine to the float32 ONNX model, held-out
   ``pydoc_sentences("evaluation")``) of marked vs unmarked compressed model, through onnxruntime;
4. **robustness** on a few customers: onnxruntime int8 dynamic re-quantisation, float16 weights,
   10 % / 30 % magnitude pruning, self-distillation fine-tuning on other text, averaging two
   customers' models, and cutting the embedding branch out (its non-zero L1 rows; its largest-norm rows).

    python benchmarks/watermark_minilm.py [--customers 100] [--work DIR]
        # writes results/watermark_minilm.{json,png,md}; then: python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import inspect
import io
import json
import logging
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from quantseal import keys as qk
from quantseal.checkpoint import is_checkpoint, load_compressed, read_checkpoint, write_checkpoint
from quantseal.cli import main as cli_main
from quantseal.compress.markboard import Board, BoardConfig, load_board, save_board, train_board
from quantseal.export.onnx import _float_encoder, _trace_to_onnx, export_onnx, write_model
from quantseal.export.watermark import export_marked, mark_checkpoint, swap_into_template
from quantseal.models import default_model_path, encode, load_model
from quantseal.quality import embed_texts, embedding_error
from quantseal.runtime.session import Session
from quantseal.runtime.verify import onnx_embed_fn, ownership_p_value, verify
from quantseal.text import TextTokenizer, pydoc_sentences

HERE = Path(__file__).resolve().parent
EMB = "embeddings.word_embeddings"
ALPHA = 1e-6
BITS = 64
BASE_BUDGET = 4.5
OTHER_BUDGETS = (3.5, 6.0)
SLOW_EXPORTS = 3  # customers also exported by the slow path (timing)
PRUNE = (0.1, 0.3)
FT_STEPS, FT_BATCH, FT_LR, FT_MAXLEN = 200, 16, 1e-4, 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_key(label: str) -> bytes:
    """A fixed benchmark key (reproducible runs; a real owner uses ``quantseal keygen``)."""
    return hashlib.sha256(f"quantseal benchmark watermark key {label}".encode()).digest()


def rekey_board(board: Board, key: bytes) -> Board:
    """Key B's board: key A's tensors with B's trigger derivation (B's tokens, hosts, directions)."""
    m = dict(board.manifest)
    ts = qk.derive_triggers(key, board.tokenizer(), m["bits"], m["hosts"], m["triggers_per_bit"],
                            m["tokens_per_bit"], m["hidden"])
    m.update(key_id=qk.key_id(key), trigger_digest=ts.digest())
    return Board(m, board.tensors, board.path)


def quiet_cli(argv: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"quantseal {' '.join(map(str, argv))}: exit {rc}")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def compress(model_path: Path, out: Path, budget: float, method: str, *extra: str) -> dict:
    if is_checkpoint(out):
        return {"cached": True}
    t0 = time.perf_counter()
    res = quiet_cli(["compress", model_path, "-o", out, "--budget", budget, "--method", method, "--workers", 2,
                     "--json", *extra])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- ONNX helpers
def verify_onnx(path: Path, key: bytes, reg: qk.Registry, board_manifest: dict, tok, ts=None) -> dict:
    res = verify(onnx_embed_fn(path, provider="cpu"), key, reg, board_manifest, tok, alpha=ALPHA)
    if ts is not None:
        res["stats"] = np.asarray(res["statistics"])
    return res


def verify_torch(model, key, reg, board_manifest, tok) -> dict:
    @torch.no_grad()
    def embed(batch):
        return encode(model, {k: torch.from_numpy(v) for k, v in batch.items()}).numpy()

    return verify(embed, key, reg, board_manifest, tok, alpha=ALPHA)


def onnx_embed_texts(path: Path, tok, texts: list[str], batch: int = 32) -> np.ndarray:
    sess = Session(path, provider="cpu")
    out = [sess.run(tok(texts[i:i + batch]), ["sentence_embedding"])["sentence_embedding"]
           for i in range(0, len(texts), batch)]
    return np.concatenate(out).astype(np.float64)


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return path


def float_inits(proto: onnx.ModelProto, dtypes=(TensorProto.FLOAT, TensorProto.FLOAT16), min_size: int = 2):
    return [t for t in proto.graph.initializer if t.data_type in dtypes and np.prod(t.dims) >= min_size
            and len(t.dims) >= 2]


def set_init(proto: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    for t in proto.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)


def get_init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for t in proto.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def to_float16_weights(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every float32 initialiser stored as float16, followed by a Cast back to float32 (the file
    halves its float weights; onnxruntime computes in float32)."""
    p = copy.deepcopy(proto)
    casts, n = [], 0
    for t in p.graph.initializer:
        if t.data_type != TensorProto.FLOAT or np.prod(t.dims) < 2:
            continue
        arr = numpy_helper.to_array(t).astype(np.float16)
        old = t.name
        t.CopyFrom(numpy_helper.from_array(arr, old + ".fp16"))
        casts.append(helper.make_node("Cast", [old + ".fp16"], [old], to=TensorProto.FLOAT, name=old + ".cast"))
        n += 1
    nodes = casts + list(p.graph.node)
    del p.graph.node[:]
    p.graph.node.extend(nodes)
    return p, n


def upcast_fp16_inits(proto: onnx.ModelProto) -> onnx.ModelProto:
    """float16 initialisers as float32 (their Cast-to-float consumers become no-ops)."""
    p = copy.deepcopy(proto)
    for t in p.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    return p


def quantize_int8(src: Path, dst: Path) -> dict:
    """onnxruntime.quantization.quantize_dynamic (int8 weights, default settings)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # DefaultTensorType: a tensor shape inference cannot type (a decoder graph's contrib-op outputs) is float
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    q = onnx.load(str(dst))
    ops = {}
    for node in q.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    int8 = [t.name for t in q.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    return {"ops": ops, "int8_initializers": len(int8),
            "int8_names": sorted(n.replace("_quantized", "") for n in int8 if n.endswith("_quantized"))}


def loads(path: Path) -> str | None:
    try:
        Session(path, provider="cpu")
        return None
    except Exception as exc:  # quantseal's BadInput carrying onnxruntime's first line
        return str(exc)[:300]


def prune(arr: np.ndarray, frac: float) -> np.ndarray:
    """Zero the ``frac`` smallest-magnitude entries (per tensor)."""
    flat = arr.reshape(-1).copy()
    k = int(round(frac * flat.size))
    if k:
        flat[np.argpartition(np.abs(flat.astype(np.float32)), k - 1)[:k]] = 0
    return flat.reshape(arr.shape)


def effective_table(proto: onnx.ModelProto, emb: str = EMB) -> np.ndarray:
    """E' (+ L1·L2 when the file has an embedding branch), float64: what the lookup reads."""
    eff = get_init(proto, f"{emb}.weight").astype(np.float64)
    if any(t.name == f"{emb}.L1" for t in proto.graph.initializer):
        eff = eff + get_init(proto, f"{emb}.L1").astype(np.float64) @ get_init(proto, f"{emb}.L2").astype(np.float64)
    return eff


def with_table(proto: onnx.ModelProto, table: np.ndarray, emb: str = EMB) -> onnx.ModelProto:
    """``proto`` with the embedding table replaced (in its dtype) and any branch zeroed."""
    out = copy.deepcopy(proto)
    set_init(out, f"{emb}.weight", table.astype(get_init(proto, f"{emb}.weight").dtype))
    if any(t.name == f"{emb}.L1" for t in proto.graph.initializer):
        set_init(out, f"{emb}.L1", np.zeros_like(get_init(proto, f"{emb}.L1")))
    return out


def projection_clean(proto: onnx.ModelProto, n_rows: int, score: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """A key-less attack on an embedding that carries the mark in a low-rank branch: fold the
    branch into the table (E_eff = E' + L1·L2; mixing the factors does not change the product),
    project every row onto span(L2) — the only directions the branch moves a row along — and for
    the ``n_rows`` rows whose projection stands out most (``score``: "norm" ‖E_eff[t]·U‖, or
    "fraction" ‖E_eff[t]·U‖ / ‖E_eff[t]‖) remove that component.  Returns the attacked model
    (table E_eff with those rows cleaned, L1 = 0) and the rows touched."""
    eff = effective_table(proto)
    u = np.linalg.qr(get_init(proto, f"{EMB}.L2").astype(np.float64).T)[0]  # (H, r): basis of span(L2)
    proj = eff @ u
    pn = np.linalg.norm(proj, axis=1)
    val = pn if score == "norm" else pn / np.maximum(np.linalg.norm(eff, axis=1), 1e-12)
    rows = np.argsort(-val)[:n_rows]
    eff[rows] -= proj[rows] @ u.T
    return with_table(proto, eff), rows


def attacker(rob: dict, key: bytes, reg: qk.Registry, board: Board, tok, ref: np.ndarray, eval_texts: list[str]):
    """``attack(name, customer, path, owner=None, extra=None, fidelity=False)``: verify an
    attacked file and record the run under ``rob[name]`` (or that it does not load)."""

    def attack(name: str, c: str, path: Path, owner: str | None = None, extra: dict | None = None,
               fidelity: bool = False):
        err = loads(path)
        if err is not None:
            rob.setdefault(name, {"runs": []})["runs"].append({"customer": c, "error": err})
            return
        r = summary(verify_onnx(path, key, reg, board.manifest, tok), owner or c)
        r["customer"] = c
        if fidelity:
            r["embedding_error"] = embedding_error(ref, onnx_embed_texts(path, tok, eval_texts))
        r.update(extra or {})
        rob.setdefault(name, {"runs": []})["runs"].append(r)

    return attack


def projection_only(args) -> None:
    """``--projection-only``: run :func:`table_attacks` on the kept customers' files of an
    earlier run's ``--work`` folder and add them to its results JSON (re-rendered)."""
    R = json.loads(args.out.read_text())
    work = args.work
    tok = TextTokenizer(default_model_path())
    key_a = qk.read_key(work / "owner_A.key")
    board = load_board(work / "board_A")
    reg_a = qk.Registry(key_a, BITS)
    customers = [f"customer-{i:03d}" for i in range(R["attribution"]["customers_asked"])]
    for c in customers:
        reg_a.add(c)
    trig = set(int(t) for t in qk.triggers_of(board.manifest, key_a, tok).tokens.reshape(-1))
    eval_texts = pydoc_sentences("evaluation")
    ref = onnx_embed_texts(work / "innocent" / "float32" / "model.onnx", tok, eval_texts)
    rob = {k: v for k, v in R["robustness"].items() if not k.startswith(("remove span(L2)", "replace every row"))}
    attack = attacker(rob, key_a, reg_a, board, tok, ref, eval_texts)
    for c in customers[:args.robust]:
        table_attacks(onnx.load(str(work / "customers" / c / "model.onnx")), trig, c, work / "attacked", attack)
        log(f"projection attacks done for {c}")
    shutil.rmtree(work / "attacked", ignore_errors=True)
    aggregate(rob)
    R["robustness"] = rob
    R["projection_attacks_added"] = "python benchmarks/watermark_minilm.py --projection-only --work DIR"
    args.out.write_text(json.dumps(R, indent=1) + "\n")
    plot(R, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(table(R) + "\n")


def more_innocents(args) -> None:
    """``--more-innocents N``: N more customers' files marked under owner B's key and read with
    owner A's (and A's read with B's), from an earlier run's ``--work`` folder, added to its innocent
    rows (re-rendered): the innocents nearest a real mark, a model carrying someone else's board."""
    R = json.loads(args.out.read_text())
    work = args.work
    tok = TextTokenizer(default_model_path())
    key_a, key_b = qk.read_key(work / "owner_A.key"), bench_key("B")
    board = load_board(work / "board_A")
    board_b = rekey_board(board, key_b)
    reg_a, reg_b = qk.Registry(key_a, BITS), qk.Registry(key_b, BITS)
    customers = [f"customer-{i:03d}" for i in range(R["attribution"]["customers_asked"])]
    for c in customers:
        reg_a.add(c)
        reg_b.add(c)
    ck = work / f"rtn_{BASE_BUDGET}"
    manifest, tensors = read_checkpoint(ck)
    template = work / "customers" / customers[0] / "model.onnx"
    rows = R["innocent"]["rows"]
    start = args.robust
    for c in customers[start:start + args.more_innocents]:
        for mark_key, mark_board, mark_reg, read_key, read_board, read_reg, label in (
                (key_b, board_b, reg_b, key_a, board, reg_a, ("B", "A")),
                (key_a, board, reg_a, key_b, board_b, reg_b, ("A", "B"))):
            m, t = mark_checkpoint(manifest, tensors, mark_board, mark_key, mark_reg, c)
            path = work / "innocent" / f"key{label[0]}_{c}" / "model.onnx"
            swap_into_template(template, path, m, t)
            r = summary(verify_onnx(path, read_key, read_reg, read_board.manifest, tok), None)
            r["read_with"] = f"key {label[1]}"
            rows[f"marked under key {label[0]} ({c}), read with key {label[1]}"] = r
            shutil.rmtree(path.parent, ignore_errors=True)
        log(f"innocents: {c} under the other key read by each owner")
    checked = [v for v in rows.values() if "owner" in v]
    R["innocent"] = {"models": len(checked), "false_claims": sum(v["owner"] is not None for v in checked),
                     "min_p_value": min(v["p_value"] for v in checked), "rows": rows}
    R["more_innocents_added"] = f"python benchmarks/watermark_minilm.py --more-innocents {args.more_innocents} --work DIR"
    args.out.write_text(json.dumps(R, indent=1) + "\n")
    plot(R, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(table(R) + "\n")


def table_attacks(proto: onnx.ModelProto, trig: set[int], c: str, att: Path, attack) -> None:
    """Key-less attacks on where the mark lives: the span(L2) projection (only when the file has
    an embedding branch), and replacing every row the scheme could draw triggers from (ids from
    ``RARE_FROM`` on; the attacker knows the scheme, not the key) by their mean."""
    if any(t.name == f"{EMB}.L1" for t in proto.graph.initializer):
        for n_rows in (len(trig), 4 * len(trig)):
            for score in ("norm", "fraction"):
                pp, rows = projection_clean(proto, n_rows, score)
                attack(f"remove span(L2) from the {n_rows} rows of E + L1·L2 with the largest projection {score}", c,
                       save_proto(pp, att / c / "proj" / "model.onnx"), fidelity=True,
                       extra={"rows_cleaned": int(n_rows), "trigger_rows_hit": len(trig & set(rows.tolist())),
                              "trigger_rows": len(trig)})
    eff = effective_table(proto)
    rare = np.arange(qk.RARE_FROM, eff.shape[0])
    eff[rare] = eff[rare].mean(0)
    attack(f"replace every row from id {qk.RARE_FROM} on ({len(rare)} rare ids) by their mean (no key needed)", c,
           save_proto(with_table(proto, eff), att / c / "rare" / "model.onnx"), fidelity=True,
           extra={"rows_replaced": int(len(rare)), "trigger_rows_hit": len(trig & set(rare.tolist())),
                  "trigger_rows": len(trig)})


# ----------------------------------------------------------------------------- fine-tuning text
def other_text(exclude: set[str], limit: int = 2000) -> list[str]:
    """Sentences from standard-library docstrings (not pydoc_data.topics), 40–250 characters."""
    import argparse as m1, collections as m2, email.message as m3, functools as m4, http.client as m5
    import itertools as m6, json as m7, logging as m8, pathlib as m9, re as m10, string as m11, subprocess as m12
    import textwrap as m13, threading as m14, typing as m15, unittest as m16, urllib.parse as m17, zipfile as m18
    import csv as m19, datetime as m20, decimal as m21, fractions as m22, heapq as m23, random as m24

    seen, out = set(), []
    for mod in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21,
                m22, m23, m24):
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 250 and re.search(r"[a-z]{3}", s) and s not in seen and s not in exclude:
                    seen.add(s)
                    out.append(s)
    return out[:limit]


def customer_trainables(ck_dir: Path) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A customer's checkpoint in torch with everything frozen but what a fine-tuning attack
    trains: the token table (and its low-rank factors) and any compressed Linear's factors."""
    from quantseal.compress.qlinear import CompressedEmbedding, CompressedLinear

    model, _, _ = load_compressed(ck_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    train = []
    for mod in model.modules():
        if isinstance(mod, CompressedEmbedding):
            train += [mod.w_hat] + ([mod.l1, mod.l2] if mod.rank else [])
        elif isinstance(mod, CompressedLinear) and mod.rank:
            train += [mod.l1, mod.l2]
    for t in train:
        t.requires_grad_(True)
    return model, train


def finetune(ck_dir: Path, teacher, tok, texts: list[str], seed: int, steps: int = FT_STEPS) -> tuple[torch.nn.Module, dict]:
    """Self-distillation toward the float32 model: the customer's embedding table and low-rank
    factors (every ``w_hat``/``l1``/``l2`` of the embedding, ``l1``/``l2`` of compressed Linears)
    trained with Adam on ``1 − cos(student, float32 teacher)`` over ``texts``."""
    model, train = customer_trainables(ck_dir)
    enc = tok(texts)
    enc = {k: torch.from_numpy(v[:, :FT_MAXLEN].copy()) for k, v in enc.items()}
    with torch.no_grad():
        target = torch.cat([encode(teacher, {k: v[i:i + 64] for k, v in enc.items()}) for i in range(0, len(texts), 64)])
    opt = torch.optim.Adam(train, lr=FT_LR)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    model.eval()
    for step in range(steps):
        idx = torch.randint(0, len(texts), (FT_BATCH,), generator=gen)
        batch = {k: v[idx] for k, v in enc.items()}
        width = int(batch["attention_mask"].sum(1).max())
        batch = {k: v[:, :width] for k, v in batch.items()}
        loss = (1 - (encode(model, batch) * target[idx]).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for t in train:
        t.requires_grad_(False)
    return model, {"steps": steps, "batch": FT_BATCH, "lr": FT_LR, "seconds": time.perf_counter() - t0,
                   "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
                   "trainable_tensors": len(train)}


# ----------------------------------------------------------------------------- main
def summary(res: dict, owner: str | None) -> dict:
    """The fields kept for one verified model; ``owner``: the id the model should be claimed by."""
    out = {k: res[k] for k in ("owner", "nearest", "bit_errors", "p_value", "queries", "seconds", "min_abs_statistic")}
    out["correct"] = res["owner"] == owner
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=100)
    ap.add_argument("--robust", type=int, default=2, help="customers per robustness attack")
    ap.add_argument("--finetune", type=int, default=1, help="customers fine-tuned")
    ap.add_argument("--ft-steps", type=int, default=FT_STEPS, help="fine-tuning steps")
    ap.add_argument("--max-loop-seconds", type=float, default=600,
                    help="stop the attribution loop early (and say so) past this wall time")
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept; cached models are reused)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "watermark_minilm.json")
    ap.add_argument("--render-only", action="store_true", help="re-render .md and .png from the JSON")
    ap.add_argument("--projection-only", action="store_true",
                    help="add the span(L2) projection attacks to the JSON, from an earlier run's --work")
    ap.add_argument("--more-innocents", type=int, default=0,
                    help="add N customers marked under another key as innocents, to an earlier run's --work JSON")
    args = ap.parse_args()
    if args.more_innocents:
        more_innocents(args)
        return
    if args.projection_only:
        projection_only(args)
        return
    if args.render_only:
        R = json.loads(args.out.read_text())
        aggregate(R["robustness"])
        args.out.write_text(json.dumps(R, indent=1) + "\n")
        plot(R, args.out.with_suffix(".png"))
        args.out.with_suffix(".md").write_text(table(R) + "\n")
        return
    t_all = time.perf_counter()
    torch.manual_seed(0)
    work = args.work or Path(tempfile.mkdtemp(prefix="quantseal-wm-"))
    work.mkdir(parents=True, exist_ok=True)
    model_path = default_model_path()
    tok = TextTokenizer(model_path)
    eval_texts = pydoc_sentences("evaluation")
    key_file = work / "owner_A.key"
    key_a = qk.read_key(key_file) if key_file.is_file() else qk.write_key(key_file)  # quantseal keygen
    key_b = bench_key("B")
    R: dict = {"model": "all-MiniLM-L6-v2", "command": "python benchmarks/watermark_minilm.py",
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, onnxruntime CPU",
               "alpha": ALPHA, "bits": BITS, "compression": f"quantseal compress --budget {BASE_BUDGET} --method rtn"}

    def dump():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(R, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n")

    # --- models, board, registries
    ck = work / f"rtn_{BASE_BUDGET}"
    R["compress"] = {str(BASE_BUDGET): compress(model_path, ck, BASE_BUDGET, "rtn")}
    log(f"compressed -> {ck}")
    board_dir = work / "board_A"
    if not (board_dir / qk.BOARD_MANIFEST).is_file():
        board = train_board(ck, key_a, BoardConfig(bits=BITS))
        save_board(board, board_dir, ck)
    board = load_board(board_dir)
    tr = board.manifest["training"]
    R["board"] = {k: tr[k] for k in ("steps_run", "seconds", "train_bit_accuracy", "min_signed_stat", "rank",
                                     "triggers_per_bit", "tokens_per_bit", "steps")}
    log(f"board: {tr['steps_run']} steps, {tr['seconds']:.1f} s, train bit accuracy {tr['train_bit_accuracy']}")
    board_b = rekey_board(board, key_b)
    ts_a = qk.triggers_of(board.manifest, key_a, tok)
    reg_a, reg_b = qk.Registry(key_a, BITS), qk.Registry(key_b, BITS)
    customers = [f"customer-{i:03d}" for i in range(args.customers)]
    for c in customers:
        reg_a.add(c)
        reg_b.add(c)
    max_err = max(e for e in range(BITS + 1) if ownership_p_value(BITS, BITS - e, len(reg_a)) < ALPHA)
    R["registry"] = {"customers": len(reg_a), "min_distance": reg_a.min_distance,
                     "max_bit_errors_for_claim": max_err}
    manifest, tensors = read_checkpoint(ck)

    # --- template + slow path timing
    onnx_dir = work / "customers"
    template = onnx_dir / customers[0] / "model.onnx"
    slow = []
    for c in customers[:SLOW_EXPORTS]:
        out = (template if c == customers[0] else work / "slow" / c / "model.onnx")
        res = export_marked(ck, out, board_dir, key_a, reg_a, c)
        slow.append({"customer": c, "seconds": res["seconds"], "mark_seconds": res["mark_seconds"], "bytes": res["bytes"]})
    shutil.rmtree(work / "slow", ignore_errors=True)
    R["export_slow_path"] = slow
    log(f"slow path (export_marked): {[s['seconds'] for s in slow]} s")

    # --- 1. attribution over the customers (fast path); the first 3·robust files are kept for the
    # attacks below, which run before the rest of the loop (capped by --max-loop-seconds)
    rows, stats = [], []
    loop_time = [0.0]

    def attribute(i: int, c: str) -> None:
        t_c = time.perf_counter()
        t0 = time.perf_counter()
        man_c, ten_c = read_checkpoint(ck)
        man_c, ten_c = mark_checkpoint(man_c, ten_c, board, key_a, reg_a, c)
        path = onnx_dir / c / "model.onnx"
        if c != customers[0]:
            swap_into_template(template, path, man_c, ten_c, ck / "tokenizer.json")
        export_s = time.perf_counter() - t0
        res = verify_onnx(path, key_a, reg_a, board.manifest, tok, ts_a)
        code = reg_a.codeword(c)
        stats.append(res.pop("stats") * (2.0 * code - 1))
        row = summary(res, c)
        row.update(customer=c, export_seconds=export_s if c != customers[0] else None)
        rows.append(row)
        if i >= 3 * args.robust:  # keep the files robustness and averaging use, drop the rest
            shutil.rmtree(onnx_dir / c, ignore_errors=True)
        if i % 10 == 0 or not row["correct"] or row["bit_errors"]:
            log(f"  {c}: owner {row['owner']}, {row['bit_errors']} bit errors, p {row['p_value']:.2e}, "
                f"export {export_s:.2f} s, verify {row['seconds']:.2f} s")
        loop_time[0] += time.perf_counter() - t_c

    n_keep = min(3 * args.robust, len(customers))
    for i in range(n_keep):
        attribute(i, customers[i])
    log(f"first {n_keep} customers verified")

    def finish_attribution() -> None:
        for i in range(n_keep, len(customers)):
            if loop_time[0] > args.max_loop_seconds:
                log(f"attribution loop stopped after {i} customers (--max-loop-seconds)")
                break
            attribute(i, customers[i])
        summarise_attribution()

    def summarise_attribution() -> None:
        st = np.asarray(stats)
        ex = [r["export_seconds"] for r in rows if r["export_seconds"] is not None]
        R["attribution"] = {
            "customers_run": len(rows), "customers_asked": args.customers,
            "correct": sum(r["correct"] for r in rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "bit_errors_total": int(sum(r["bit_errors"] for r in rows)),
            "bit_errors_max": int(max(r["bit_errors"] for r in rows)),
            "bit_error_histogram": {str(e): sum(r["bit_errors"] == e for r in rows) for e in sorted({r["bit_errors"] for r in rows})},
            "p_value": {"min": min(r["p_value"] for r in rows), "median": float(np.median([r["p_value"] for r in rows])),
                        "max": max(r["p_value"] for r in rows)},
            "export_seconds_fast": {"mean": float(np.mean(ex)), "median": float(np.median(ex)), "max": float(np.max(ex))},
            "verify_seconds": {"mean": float(np.mean([r["seconds"] for r in rows])),
                               "max": float(np.max([r["seconds"] for r in rows]))},
            "queries": sorted({r["queries"] for r in rows}),
            "signed_statistic": {"min": float(st.min()), "p1": float(np.percentile(st, 1)),
                                 "median": float(np.median(st)), "mean": float(st.mean())},
            "loop_seconds": loop_time[0], "rows": rows,
        }
        a = R["attribution"]
        log(f"attribution: {a['correct']}/{a['customers_run']}, max bit errors {a['bit_errors_max']}, "
            f"export {a['export_seconds_fast']['mean']:.2f} s, verify {a['verify_seconds']['mean']:.2f} s")
        dump()

    summarise_attribution()

    # --- 2. innocent models
    innocent = {}
    inn_dir = work / "innocent"
    fp32 = inn_dir / "float32" / "model.onnx"
    if not fp32.is_file():
        fmodel, _ = load_model(model_path)
        wrapper, _ = _float_encoder(fmodel)
        with tempfile.TemporaryDirectory() as tmp:
            _trace_to_onnx(wrapper, Path(tmp) / "f.onnx", int(fmodel.config.vocab_size))
            fp32.parent.mkdir(parents=True, exist_ok=True)
            write_model(onnx.load(str(Path(tmp) / "f.onnx")), fp32, model_path / "tokenizer.json")
    cands: dict[str, Path] = {"float32 ONNX": fp32}
    unmarked = inn_dir / "rtn_unmarked" / "model.onnx"
    if not unmarked.is_file():
        export_onnx(ck, unmarked)
    cands[f"RTN {BASE_BUDGET} bits, unmarked"] = unmarked
    for b in OTHER_BUDGETS:
        ckb = work / f"rtn_{b}"
        R["compress"][str(b)] = compress(model_path, ckb, b, "rtn")
        p = inn_dir / f"rtn_{b}" / "model.onnx"
        if not p.is_file():
            export_onnx(ckb, p)
        cands[f"RTN {b} bits"] = p
    cklq = work / f"lq_{BASE_BUDGET}"
    R["compress"][f"lq {BASE_BUDGET}"] = compress(model_path, cklq, BASE_BUDGET, "lq", "--formats", "int4",
                                                 "--ranks", "0")
    p = inn_dir / "lq" / "model.onnx"
    if not p.is_file():
        export_onnx(cklq, p)
    cands[f"LQ {BASE_BUDGET} bits (int4 formats, rank 0)"] = p
    try:  # onnxruntime's own INT4 quantiser on the float32 ONNX
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        p = inn_dir / "ort_int4" / "model.onnx"
        if not p.is_file():
            q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
            q.process()
            save_proto(q.model.model, p)
        cands["onnxruntime MatMulNBitsQuantizer INT4 b32 (float32 ONNX)"] = p
    except Exception as exc:  # noqa: BLE001 - report, do not stop
        innocent["onnxruntime MatMulNBitsQuantizer INT4 b32 (float32 ONNX)"] = {"error": str(exc)[:200]}
    p = inn_dir / "fp32_int8" / "model.onnx"
    quantize_int8(fp32, p)
    cands["float32 ONNX → quantize_dynamic int8"] = p
    p16, _ = to_float16_weights(onnx.load(str(fp32)))
    cands["float32 ONNX → float16 weights"] = save_proto(p16, inn_dir / "fp32_fp16" / "model.onnx")
    for name, path in cands.items():
        innocent[name] = summary(verify_onnx(path, key_a, reg_a, board.manifest, tok), None)
        innocent[name]["read_with"] = "key A"
    # other keys: marked under B, read with A; marked under A, read with B
    for c in customers[:args.robust]:
        m_b, t_b = mark_checkpoint(manifest, tensors, board_b, key_b, reg_b, c)
        p = inn_dir / f"keyB_{c}" / "model.onnx"
        swap_into_template(template, p, m_b, t_b)
        r = summary(verify_onnx(p, key_a, reg_a, board.manifest, tok), None)
        r["read_with"] = "key A"
        innocent[f"marked under key B ({c}), read with key A"] = r
        shutil.rmtree(p.parent, ignore_errors=True)
        r = summary(verify_onnx(onnx_dir / c / "model.onnx", key_b, reg_b, board_b.manifest, tok), None)
        r["read_with"] = "key B"
        innocent[f"marked under key A ({c}), read with key B"] = r
    r = summary(verify_onnx(unmarked, key_b, reg_b, board_b.manifest, tok), None)
    r["read_with"] = "key B"
    innocent[f"RTN {BASE_BUDGET} bits unmarked, read with key B"] = r
    checked = [v for v in innocent.values() if "owner" in v]
    R["innocent"] = {"models": len(checked), "false_claims": sum(v["owner"] is not None for v in checked),
                     "min_p_value": min(v["p_value"] for v in checked), "rows": innocent}
    log(f"innocent: {R['innocent']['false_claims']} false claims of {len(checked)}, min p {R['innocent']['min_p_value']:.3g}")
    dump()

    # --- 3. fidelity (onnxruntime, held-out sentences)
    ref = onnx_embed_texts(fp32, tok, eval_texts)
    err_unmarked = embedding_error(ref, onnx_embed_texts(unmarked, tok, eval_texts))
    err_marked = [embedding_error(ref, onnx_embed_texts(onnx_dir / c / "model.onnx", tok, eval_texts))
                  for c in customers[:args.robust]]
    trig = set(int(t) for t in ts_a.tokens.reshape(-1))
    R["fidelity"] = {"eval_sentences": len(eval_texts), "unmarked_error": err_unmarked,
                     "marked_error": err_marked, "max_difference": max(e - err_unmarked for e in err_marked),
                     "eval_sentences_with_trigger_tokens": sum(bool(trig & set(tok.encode_ids(s))) for s in eval_texts)}
    log(f"fidelity: unmarked {err_unmarked:.6f}, marked {err_marked}")

    # --- 4. robustness
    rob: dict[str, dict] = {}
    attack = attacker(rob, key_a, reg_a, board, tok, ref, eval_texts)

    att = work / "attacked"
    robust_customers = customers[:args.robust]
    for c in robust_customers:
        try:
            src = onnx_dir / c / "model.onnx"
            proto = onnx.load(str(src))
            # int8 dynamic re-quantisation of the marked file, default settings
            p = att / c / "int8_default" / "model.onnx"
            info = quantize_int8(src, p)
            attack("int8 dynamic (quantize_dynamic defaults)", c, p, extra={"int8_weights": info["int8_names"]}, fidelity=True)
            # the same after upcasting the float16 low-rank factors (the default output does not load)
            up = save_proto(upcast_fp16_inits(proto), att / c / "up" / "model.onnx")
            p = att / c / "int8_up" / "model.onnx"
            info = quantize_int8(up, p)
            attack("int8 dynamic (fp16 factors upcast first)", c, p, extra={"int8_weights": info["int8_names"]}, fidelity=True)
            # dequantise everything to a float32 graph (what the attacker can compute from the file), then int8
            ckc = att / c / "ck"
            m_c, t_c = mark_checkpoint(manifest, tensors, board, key_a, reg_a, c)
            # the ONNX file's own table (and factors, if any; not a fresh obfuscation): its effective weights
            t_c = dict(t_c)
            for k in (f"{EMB}.weight", f"{EMB}.L1", f"{EMB}.L2"):
                if k in t_c:
                    t_c[k] = torch.from_numpy(get_init(proto, k).copy())
            write_checkpoint(ckc, m_c, t_c, ck)
            fm, _, _ = load_compressed(ckc)
            wrapper, _ = _float_encoder(fm)
            pf = att / c / "float" / "model.onnx"
            pf.parent.mkdir(parents=True, exist_ok=True)
            _trace_to_onnx(wrapper, pf, int(fm.config.vocab_size))
            del wrapper, fm
            p = att / c / "int8_full" / "model.onnx"
            info = quantize_int8(pf, p)
            attack("int8 dynamic of the dequantised float32 graph (every MatMul + Gather int8)", c, p,
                   extra={"int8_tensors": len(info["int8_names"])}, fidelity=True)
            shutil.rmtree(pf.parent, ignore_errors=True)
            # float16
            p16, n16 = to_float16_weights(proto)
            attack("float16 weights (every float32 initialiser → float16 + Cast)", c,
                   save_proto(p16, att / c / "fp16" / "model.onnx"), extra={"converted": n16}, fidelity=True)
            # pruning
            has_branch = any(t.name == f"{EMB}.L1" for t in proto.graph.initializer)
            for frac in PRUNE:
                for scope, pick in (("all float initialisers", lambda t: True),
                                    ("embedding table", lambda t: t.name == f"{EMB}.weight"),
                                    ("embedding low-rank factors", lambda t: t.name in (f"{EMB}.L1", f"{EMB}.L2"))):
                    if scope == "embedding low-rank factors" and not has_branch:
                        continue
                    pp = copy.deepcopy(proto)
                    for t in float_inits(pp):
                        if pick(t):
                            set_init(pp, t.name, prune(numpy_helper.to_array(t), frac))
                    attack(f"magnitude pruning {int(frac * 100)} % ({scope})", c,
                           save_proto(pp, att / c / "prune" / "model.onnx"), fidelity=True)
            # cutting the branch out: the embedding's L1 rows an inspecting attacker can see
            # (only when the mark lives in a low-rank branch: quantised tables)
            l1 = get_init(proto, f"{EMB}.L1") if has_branch else np.zeros((0, 0))
            nz = np.flatnonzero(np.abs(l1).sum(1))
            norms = np.linalg.norm(l1.astype(np.float64), axis=1)
            cuts = (("zero the non-zero rows of the embedding low-rank factor L1", nz),
                    (f"zero the {len(trig)} largest-norm rows of the embedding L1", np.argsort(-norms)[:len(trig)]))
            for label, zrows in (cuts if has_branch else ()):
                pp = copy.deepcopy(proto)
                z = l1.copy()
                z[zrows] = 0
                set_init(pp, f"{EMB}.L1", z)
                attack(label, c, save_proto(pp, att / c / "zero" / "model.onnx"), fidelity=True,
                       extra={"zeroed_rows": int(len(zrows)), "nonzero_rows": int(len(nz)),
                              "trigger_rows_hit": len(trig & set(zrows.tolist())),
                              "rows_are_the_trigger_tokens": set(zrows.tolist()) == trig})
            table_attacks(proto, trig, c, att, attack)
            shutil.rmtree(att / c, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, not fatal
            log(f"robustness {c} failed: {type(exc).__name__}: {exc}")
            R.setdefault("errors", []).append(f"robustness {c}: {type(exc).__name__}: {str(exc)[:300]}")
        log(f"  robustness done for {c}")
    # averaging two customers' models
    for j in range(args.robust):
        if args.robust + 2 * j + 1 >= len(rows):
            break
        ca, cb = customers[args.robust + 2 * j], customers[args.robust + 2 * j + 1]
        try:
            pa, pb = onnx.load(str(onnx_dir / ca / "model.onnx")), onnx.load(str(onnx_dir / cb / "model.onnx"))
            # effective weights: E + (L1a L2a + L1b L2b) / 2, the low-rank branch folded into the table
            eff = [effective_table(x) for x in (pa, pb)]
            pe = copy.deepcopy(pa)
            set_init(pe, f"{EMB}.weight", (eff[0] + eff[1]) / 2)
            if any(t.name == f"{EMB}.L1" for t in pa.graph.initializer):
                set_init(pe, f"{EMB}.L1", np.zeros_like(get_init(pa, f"{EMB}.L1")))
            for name, proto in (("average of two customers (effective weights)", pe),):
                p = save_proto(proto, att / "avg" / "model.onnx")
                r = verify_onnx(p, key_a, reg_a, board.manifest, tok)
                bits = np.array([int(x) for x in r["bits"]])
                rob.setdefault(name, {"runs": []})["runs"].append({
                    **summary(r, None), "customers": [ca, cb],
                    "errors_vs_a": qk.hamming(bits, reg_a.codeword(ca)), "errors_vs_b": qk.hamming(bits, reg_a.codeword(cb)),
                    "a_b_distance": qk.hamming(reg_a.codeword(ca), reg_a.codeword(cb)),
                    "claimed": r["owner"], "embedding_error": embedding_error(ref, onnx_embed_texts(p, tok, eval_texts))})
            # naive: every float initialiser averaged element-wise (factors of two obfuscations mixed)
            pn = copy.deepcopy(pa)
            for t in float_inits(pa):
                set_init(pn, t.name, (numpy_helper.to_array(t).astype(np.float64) + get_init(pb, t.name)) / 2)
            p = save_proto(pn, att / "avg" / "model.onnx")
            r = verify_onnx(p, key_a, reg_a, board.manifest, tok)
            bits = np.array([int(x) for x in r["bits"]])
            rob.setdefault("average of two customers (every float tensor element-wise)", {"runs": []})["runs"].append({
                **summary(r, None), "customers": [ca, cb],
                "errors_vs_a": qk.hamming(bits, reg_a.codeword(ca)), "errors_vs_b": qk.hamming(bits, reg_a.codeword(cb)),
                "a_b_distance": qk.hamming(reg_a.codeword(ca), reg_a.codeword(cb)), "claimed": r["owner"],
                "embedding_error": embedding_error(ref, onnx_embed_texts(p, tok, eval_texts))})
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, not fatal
            log(f"averaging {ca}+{cb} failed: {type(exc).__name__}: {exc}")
            R.setdefault("errors", []).append(f"averaging {ca}+{cb}: {type(exc).__name__}: {str(exc)[:300]}")
    shutil.rmtree(att / "avg", ignore_errors=True)
    log("averaging done")
    # fine-tuning (torch), verified through the torch model's outputs
    teacher, _ = load_model(model_path)
    teacher.eval()
    ref_t = embed_texts(teacher, tok, eval_texts)
    calib = set(pydoc_sentences("all"))
    ft_text = other_text(calib)
    R["finetune_text"] = {"source": "standard-library docstrings (not pydoc_data.topics)", "sentences": len(ft_text),
                          "sentences_with_trigger_tokens": sum(bool(trig & set(tok.encode_ids(s))) for s in ft_text)}
    for i, c in enumerate(customers[:args.finetune]):
        try:
            ckc = att / c / "ck"
            write_checkpoint(ckc, *mark_checkpoint(manifest, tensors, board, key_a, reg_a, c), ck)
            model, info = finetune(ckc, teacher, tok, ft_text, seed=i, steps=args.ft_steps)
            r = summary(verify_torch(model, key_a, reg_a, board.manifest, tok), c)
            before, _, _ = load_compressed(ckc)
            r.update(customer=c, **info, embedding_error_before=embedding_error(ref_t, embed_texts(before, tok, eval_texts)),
                     embedding_error=embedding_error(ref_t, embed_texts(model, tok, eval_texts)))
            rob.setdefault(f"fine-tuning {args.ft_steps} steps (self-distillation on other text)", {"runs": []})["runs"].append(r)
            shutil.rmtree(att / c, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, not fatal
            log(f"fine-tuning {c} failed: {type(exc).__name__}: {exc}")
            R.setdefault("errors", []).append(f"fine-tuning {c}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        log(f"  fine-tuned {c}: owner {r['owner']}, {r['bit_errors']} bit errors, loss {info['loss_first10']:.4f} → "
            f"{info['loss_last10']:.4f}, {info['seconds']:.0f} s")
    aggregate(rob)
    R["robustness"] = rob
    dump()
    finish_attribution()
    R["total_seconds"] = time.perf_counter() - t_all
    dump()
    plot(R, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(table(R) + "\n")
    log(f"wrote {args.out} (+ .png, .md) in {R['total_seconds']:.0f} s")


def aggregate(rob: dict) -> None:
    """Per attack: attributed (the attacked customer claimed; for an average of two customers,
    either of them), bit errors, who was claimed, mean embedding error."""
    for name, v in rob.items():
        runs = [x for x in v["runs"] if "owner" in x]
        v["attributed"] = sum((x["owner"] in x["customers"]) if "customers" in x else x["correct"] for x in runs)
        v["n"] = len(runs)
        v["failed_to_load"] = len(v["runs"]) - len(runs)
        if runs:
            v["bit_errors_mean"] = float(np.mean([x["bit_errors"] for x in runs]))
            v["bit_errors_max"] = int(max(x["bit_errors"] for x in runs))
            v["claimed"] = sorted({str(x["owner"]) for x in runs})
            if all("embedding_error" in x for x in runs):
                v["embedding_error_mean"] = float(np.mean([x["embedding_error"] for x in runs]))


# ----------------------------------------------------------------------------- outputs
def _span(values: list[int]) -> str:
    """``"124–159"`` for a sorted list of distinct query counts (one value as itself)."""
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def plot(R: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    a = R["attribution"]
    ax1.hist([r["min_abs_statistic"] for r in a["rows"]], bins=30, color="tab:blue")
    ax1.set_title(f"{a['correct']}/{a['customers_run']} customers attributed; smallest signed per-bit statistic "
                  f"over all: {a['signed_statistic']['min']:+.3f}", fontsize=9)
    ax1.set_xlabel("per customer: smallest |per-bit statistic| (0 = a coin flip)")
    ax1.set_ylabel("customers")
    labels, errs, colors = [], [], []
    for name, v in R["innocent"]["rows"].items():
        if "bit_errors" in v:
            labels.append("innocent: " + name)
            errs.append(v["bit_errors"])
            colors.append("tab:green")
    for name, v in R["robustness"].items():
        if v.get("n"):
            labels.append(name)
            errs.append(v["bit_errors_mean"])
            colors.append("tab:red" if v["attributed"] < v["n"] else "tab:blue")
    y = np.arange(len(labels))
    ax2.barh(y, errs, color=colors)
    ax2.set_yticks(y, [lab[:70] for lab in labels], fontsize=6)
    ax2.invert_yaxis()
    thr = R["registry"]["max_bit_errors_for_claim"]
    ax2.axvline(thr + 0.5, color="k", ls="--", lw=1)
    ax2.text(thr + 0.7, len(labels) - 0.5, f"claim if ≤ {thr} errors", fontsize=7)
    ax2.set_xlabel(f"bit errors of {R['bits']} vs nearest codeword (mean over runs); blue: attributed, red: not, green: innocent")
    ax2.xaxis.label.set_size(7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(R: dict) -> str:
    a, inn, fid = R["attribution"], R["innocent"], R["fidelity"]
    slow = R["export_slow_path"]
    thr = R["registry"]["max_bit_errors_for_claim"]
    lines = [
        "### Per-customer watermark (all-MiniLM-L6-v2, Hot-Swap MarkBoard)", "",
        f"`{R['command']}` — `{R['compression']}`, one {R['bits']}-bit board trained once "
        f"({R['board']['steps_run']} steps, {R['board']['seconds']:.0f} s), registry of {R['registry']['customers']} "
        f"customers (min distance {R['registry']['min_distance']}), verification through onnxruntime at "
        f"alpha = {R['alpha']:g} (a claim needs ≤ {thr} bit errors).", "",
        "| measure | value |", "|---|---|",
        f"| customers attributed correctly | {a['correct']} / {a['customers_run']}"
        + ("" if a["customers_run"] == a["customers_asked"] else f" (of {a['customers_asked']} asked; loop stopped early)") + " |",
        f"| bit errors (total / max per customer) | {a['bit_errors_total']} / {a['bit_errors_max']} |",
        f"| p-value (min / median / max) | {a['p_value']['min']:.2e} / {a['p_value']['median']:.2e} / {a['p_value']['max']:.2e} |",
        f"| smallest signed per-bit statistic (1st percentile, median) | {a['signed_statistic']['min']:+.3f} "
        f"({a['signed_statistic']['p1']:+.3f}, {a['signed_statistic']['median']:+.3f}) |",
        f"| per-customer export, fast path (mark + swap into template), mean / max | "
        f"{a['export_seconds_fast']['mean']:.2f} s / {a['export_seconds_fast']['max']:.2f} s |",
        f"| per-customer export, slow path (`export_marked`), {len(slow)} customers | "
        + ", ".join(f"{s['seconds']:.1f} s" for s in slow) + " |",
        f"| verification: queries (min–max over customers), seconds (mean / max) | {_span(a['queries'])}, "
        f"{a['verify_seconds']['mean']:.2f} s / {a['verify_seconds']['max']:.2f} s |",
        f"| false claims on innocent models | {inn['false_claims']} of {inn['models']} (smallest p = {inn['min_p_value']:.3g}) |",
        f"| embedding error: unmarked → marked ({len(fid['marked_error'])} customers) | {fid['unmarked_error']:.5f} → "
        + ", ".join(f"{e:.5f}" for e in fid["marked_error"]) + f" (max difference {fid['max_difference']:+.2e}; "
        f"{fid['eval_sentences_with_trigger_tokens']} of {fid['eval_sentences']} held-out sentences hold a trigger token) |",
        "", "Innocent models (any claim is a false claim):", "",
        "| model | read with | claimed | bit errors | p-value |", "|---|---|---|---|---|"]
    for name, v in inn["rows"].items():
        if "error" in v:
            lines.append(f"| {name} | – | failed: {v['error'][:80]} | – | – |")
        else:
            lines.append(f"| {name} | {v['read_with']} | {v['owner'] or 'none'} | {v['bit_errors']} | {v['p_value']:.3g} |")
    lines += ["", "Robustness (attacks on customers' files; attributed = the attacked customer claimed, for an average: either of the two):", "",
              "| attack | attributed | bit errors mean / max | claimed | embedding error (mean) | note |",
              "|---|---|---|---|---|---|"]
    for name, v in R["robustness"].items():
        note = []
        runs = [x for x in v["runs"] if "owner" in x]
        if v.get("failed_to_load"):
            first = next(x["error"] for x in v["runs"] if "error" in x)
            note.append(f"{v['failed_to_load']} file(s) do not load: {first[:120]}")
        if runs and runs[0].get("int8_weights"):
            note.append("int8: " + ", ".join(runs[0]["int8_weights"]))
        if runs and "int8_tensors" in runs[0]:
            note.append(f"{runs[0]['int8_tensors']} int8 weight tensors")
        if runs and "nonzero_rows" in runs[0]:
            note.append(f"{runs[0].get('zeroed_rows', runs[0]['nonzero_rows'])} rows zeroed of "
                        f"{runs[0]['nonzero_rows']} non-zero L1 rows"
                        + (f", {runs[0]['trigger_rows_hit']} of them trigger tokens" if "trigger_rows_hit" in runs[0] else "")
                        + (" (= exactly the trigger tokens)" if runs[0]["rows_are_the_trigger_tokens"] else ""))
        if runs and "errors_vs_a" in runs[0]:
            note.append("; ".join(f"{x['customers'][0][-3:]}+{x['customers'][1][-3:]}: {x['errors_vs_a']}/{x['errors_vs_b']} "
                                  f"errors vs a/b (a–b distance {x['a_b_distance']})" for x in runs))
        if runs and "loss_first10" in runs[0]:
            note.append("; ".join(f"loss {x['loss_first10']:.4f}→{x['loss_last10']:.4f}, error to float32 "
                                  f"{x['embedding_error_before']:.5f}→{x['embedding_error']:.5f}, {x['seconds']:.0f} s"
                                  for x in runs))
        if not runs:
            lines.append(f"| {name} | 0 / 0 | – | – | – | {'; '.join(note)} |")
            continue
        emb = f"{v['embedding_error_mean']:.5f}" if "embedding_error_mean" in v else "–"
        lines.append(f"| {name} | {v['attributed']} / {v['n']} | {v['bit_errors_mean']:.1f} / {v['bit_errors_max']} | "
                     f"{', '.join(v['claimed'])} | {emb} | {'; '.join(note)} |")
    lines += ["", f"Total wall time {R['total_seconds']:.0f} s on a shared 2-core machine. Plot: `results/watermark_minilm.png`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
