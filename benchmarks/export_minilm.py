"""Exported all-MiniLM-L6-v2 in onnxruntime: quality, file size, CPU latency and memory, in one run.

Side by side, all evaluated **in onnxruntime** on the held-out half of ``pydoc_data.topics``
(reference: float32 torch embeddings; embedding error = 1 − mean cosine, DESIGN §7):

* **float32 ONNX** — ``torch.onnx`` (legacy TorchScript exporter) of the float32 model through
  quantseal's own tracing wrapper (same inputs, mean pooling + L2 norm in the graph).  Not
  ``quantseal compress --formats fp32`` → ``quantseal export``: that file keeps each weight as an
  untransposed initialiser behind a ``Transpose`` node, which onnxruntime folds at load time but
  ``MatMulNBitsQuantizer`` does not see (it quantises nothing; measured below as
  ``ort_quantizer_on_quantseal_fp32_export``).  The quantseal fp32 export is still measured as a row.
* **onnxruntime's own** ``MatMulNBitsQuantizer`` on that float32 ONNX: its RTN config (Intel
  Neural Compressor's ``rtn_quantize``), HQQ, and its built-in blockwise round-to-nearest
  ("DEFAULT"), INT4 blocks 32 and 128, with and without quantised ``Gather``
  (``op_types_to_quantize`` ∋ ``Gather``).  Failures are recorded as such.
* **quantseal**: ``compress --data-aware`` at ``--budget`` 3.0/4.5/5.125/6.0 bits and
  ``--budget-mb`` 8/10/15, each → ``export``; plus the 4.5-bit plan without nf4
  (``--formats int2,int4,int8,fp16``).  One candidate table (Fisher + every candidate of every
  matrix, the token embedding included because ``--budget-mb`` plans it) is built once and solved
  per budget; a ``--budget`` plan uses the table's Linear rows only (the Fisher of a Linear does not
  depend on which other parameters are tracked), a no-nf4 plan the non-nf4 candidates only.

Per model: ORT embedding error and NN@1, file MB, stored bits/param of the 36 Linears, CPU latency
(1 and 2 intra-op threads; batch 1 and 32; sequence 128 of real tokens; warm-up, then the median of
N runs interleaved round-robin over the models so that load drift hits all of them alike), the
ratio to the float32 ONNX, and the steady (VmRSS) / peak (VmHWM) RSS of a fresh process that
loads the session (1 thread) and runs one batch-1 × 128 batch.  ``ru_maxrss`` is recorded too but
not used: on Linux it carries the launching process's RSS across fork/exec (every probe reported
this script's own RSS), whereas VmHWM belongs to the new process image alone.  Byte-identical
files (e.g. a config that ignores a requested option) are measured once.

    python benchmarks/export_minilm.py          # results/export_minilm.{json,png,md}
    python benchmarks/export_minilm.py --render # rewrite the .md/.png from the JSON only
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BUDGETS = (3.0, 4.5, 5.125, 6.0)
BUDGETS_MB = (8.0, 10.0, 15.0)
HEADLINE = 4.5
NO_NF4 = ("int2", "int4", "int8", "fp16")
ORT_ALGOS = ("RTN", "HQQ", "DEFAULT")
ORT_BLOCKS = (32, 128)
SEQ = 128
MB = 1_000_000

PROBE = r"""
import json, resource, sys
import numpy as np
def status(key="VmRSS:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
vmrss = status
import onnxruntime as ort
feed = dict(np.load(sys.argv[2]))
before = vmrss()
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
loaded = vmrss()
s.run(None, feed)
steady = vmrss()
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_before_load": before, "rss_after_load": loaded, "steady_rss": steady,
                  "peak_rss": status("VmHWM:"), "ru_maxrss": maxrss}))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- building the models
def onnx_facts(path: Path) -> dict:
    """Op counts and the stored bits/param of the Linears (MatMulNBits / MatMulBnb4 / float MatMul
    with a constant weight) of any of the ONNX files here."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}

    def nbytes(name: str) -> int:
        t = inits.get(name)
        if t is None:
            return 0
        return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    ops: dict[str, int] = {}
    for n in m.graph.node:
        key = n.op_type
        ops[key] = ops.get(key, 0) + 1
    return {"ops": dict(sorted(ops.items())), "initializer_bytes": sum(nbytes(n) for n in inits)}


def ort_linear_bits(path: Path) -> float | None:
    """Σ bytes of every MatMulNBits node's constant inputs × 8 / Σ N·K (onnxruntime's quantiser)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    total_bytes, params = 0, 0
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        params += attrs["N"] * attrs["K"]
        for name in n.input[1:]:
            t = inits.get(name)
            if t is not None:
                total_bytes += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total_bytes * 8 / params if params else None


def build_float32(model_path: Path, out: Path) -> dict:
    from quantseal.export.onnx import _float_encoder, _trace_to_onnx
    from quantseal.models import load_model, read_config

    t0 = time.perf_counter()
    model, _ = load_model(model_path)
    wrapper, _ = _float_encoder(model)
    _trace_to_onnx(wrapper, out, int(read_config(model_path).get("vocab_size", 30522)))
    return {"key": "fp32", "label": "float32 ONNX (torch.onnx)", "group": "float32", "path": str(out),
            "status": "ok", "bits_per_param": 32.0, "build_seconds": time.perf_counter() - t0}


def build_quantseal_fp32(model_path: Path, work: Path, out: Path) -> dict:
    from quantseal.compress.pipeline import CompressConfig, compress
    from quantseal.export.onnx import export_onnx

    t0 = time.perf_counter()
    ck = work / "ckpt_fp32"
    compress(CompressConfig(output=ck, model=model_path, budget_bits=32.0, formats=("fp32",), ranks=(0,),
                            method="rtn", workers=1))
    rep = export_onnx(ck, out)
    return {"key": "qs_fp32", "label": "quantseal export, fp32 plan", "group": "float32", "path": str(out),
            "status": "ok", "bits_per_param": 32.0, "build_seconds": time.perf_counter() - t0,
            "export_ops": rep["ops"]}


def ort_quantize(src: Path, out: Path, algo: str, block: int, gather: bool) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer,
                                                                 RTNWeightOnlyQuantConfig)

    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    if algo == "RTN":
        cfg = RTNWeightOnlyQuantConfig(op_types_to_quantize=ops)
    elif algo == "HQQ":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=4, op_types_to_quantize=ops,
                                       quant_axes=(("MatMul", 0), ("Gather", 1)))
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=4, op_types_to_quantize=ops,
                                           quant_axes=(("MatMul", 0), ("Gather", 1)))
    logging.disable(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block, is_symmetric=False, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
    finally:
        logging.disable(logging.NOTSET)


def build_ort(src: Path, work: Path, algo: str, block: int, gather: bool) -> dict:
    key = f"ort_{algo.lower()}_b{block}" + ("_gather" if gather else "")
    name = {"RTN": "RTN", "HQQ": "HQQ", "DEFAULT": "built-in RTN (DEFAULT)"}[algo]
    rec = {"key": key, "label": f"onnxruntime {name} INT4 b{block}" + (" + quantised Gather" if gather else ""),
           "group": "ort", "algo": algo, "block": block, "gather_requested": gather, "path": str(work / f"{key}.onnx")}
    t0 = time.perf_counter()
    try:
        ort_quantize(src, Path(rec["path"]), algo, block, gather)
    except Exception as exc:  # recorded honestly, the run goes on
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}".strip()[:400],
                   traceback=traceback.format_exc(limit=3)[-1500:])
        return rec
    facts = onnx_facts(Path(rec["path"]))
    rec.update(status="ok", build_seconds=time.perf_counter() - t0, ops=facts["ops"],
               bits_per_param=ort_linear_bits(Path(rec["path"])),
               gather_quantized=facts["ops"].get("GatherBlockQuantized", 0) > 0,
               matmulnbits_nodes=facts["ops"].get("MatMulNBits", 0))
    if rec["matmulnbits_nodes"] == 0:
        rec.update(status="failed", error="the quantiser wrote no MatMulNBits node (nothing quantised)")
    elif gather and not rec["gather_quantized"]:
        rec["note"] = "Gather requested but not quantised by this config (no GatherBlockQuantized in the output)"
    return rec


def _formats(entries) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries.values():
        key = e.format + (f"+r{e.rank}" if e.rank else "")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def linear_subtable(table, keep_candidate=lambda c: True):
    """The table restricted to its Linears (a ``--budget`` plan keeps the embedding float32) and to
    the candidates ``keep_candidate`` accepts (e.g. no nf4)."""
    from quantseal.compress.budget import MatrixOptions

    targets, fisher, cands, options = {}, {}, {}, []
    fixed = table.fixed_bytes
    for (n, (w, kind)), opt in zip(table.targets.items(), table.options):
        if kind != "linear":
            fixed += w.numel() * w.element_size()
            continue
        idx = [i for i, c in enumerate(table.cands[n]) if keep_candidate(c)]
        targets[n] = (w, kind)
        fisher[n] = table.fisher[n]
        cands[n] = [table.cands[n][i] for i in idx]
        options.append(MatrixOptions(n, [opt.labels[i] for i in idx], [opt.bytes[i] for i in idx],
                                     [opt.errors[i] for i in idx]))
    return dataclasses.replace(table, targets=targets, fisher=fisher, cands=cands, options=options, fixed_bytes=fixed)


def export_plan(table, cfg, choice, key: str, label: str, work: Path, extra: dict) -> dict:
    from quantseal import checkpoint as ckpt
    from quantseal.compress.pipeline import make_manifest, materialize
    from quantseal.export.onnx import export_onnx
    from quantseal.models import source_files

    t0 = time.perf_counter()
    tensors, entries = materialize(table, choice)
    manifest = make_manifest(table, cfg, entries, tensors)
    ck = work / f"ckpt_{key}"
    ckpt.write_checkpoint(ck, manifest, tensors, cfg.model, source_files(cfg.model, table.model))
    out = work / f"{key}.onnx"
    rep = export_onnx(ck, out)
    emb = [e for e in entries.values() if e.kind == "embedding"]
    rec = {"key": key, "label": label, "group": "quantseal", "path": str(out), "status": "ok",
           "bits_per_param": manifest.budget["bits_per_param"], "formats": _formats({k: e for k, e in entries.items()
                                                                                     if e.kind == "linear"}),
           "embedding_format": (emb[0].format + (f"+r{emb[0].rank}" if emb[0].rank else "")) if emb else "fp32 (kept)",
           "planned_error": sum(e.error for e in entries.values()), "export_ops": rep["ops"],
           "matrix_bytes": rep["matrix_bytes"], "build_seconds": time.perf_counter() - t0}
    rec.update(extra)
    return rec


def build_quantseal(model_path: Path, work: Path, workers: int, smoke: bool = False) -> tuple[list[dict], dict]:
    from quantseal.compress.pipeline import CompressConfig, build_candidate_table, plan
    from quantseal.errors import BudgetInfeasible

    base = CompressConfig(output=work / "unused", model=model_path, budget_mb=max(BUDGETS_MB), method="lq",
                          data_aware=True, workers=workers)
    if smoke:  # a fast plumbing check only: RTN, no ranks, no Fisher
        base = dataclasses.replace(base, method="rtn", data_aware=False, ranks=(0,))
    t0 = time.perf_counter()
    table = build_candidate_table(base)
    table_seconds = time.perf_counter() - t0
    log(f"candidate table (data-aware, embedding planned): {table_seconds:.1f} s")
    import quantseal.compress.pipeline as pipeline

    records = []
    lin = linear_subtable(table)
    real = pipeline.lq_decompose
    cache: dict = {}

    def memo(w, cand, fisher=None, max_iter=6, clip_search=True, **kw):
        """The same deterministic rebuild, done once per (matrix, candidate) across the plans."""
        key = (w.data_ptr(), tuple(w.shape), cand.name, id(fisher), max_iter, clip_search, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = real(w, cand, fisher, max_iter=max_iter, clip_search=clip_search, **kw)
        return cache[key]

    pipeline.lq_decompose = memo
    try:
        _plans(table, lin, base, work, records, plan, BudgetInfeasible)
    finally:
        pipeline.lq_decompose = real
    return records, {"candidate_table_seconds": table_seconds, "workers": workers,
                     "candidates": sum(len(c) for c in table.cands.values()),
                     "plan_rebuilds": len(cache), "config": {"method": base.method, "data_aware": base.data_aware,
                                                             "ranks": list(base.ranks), "formats": list(base.formats),
                                                             "calib_samples": base.calib_samples}}


def _plans(table, lin, base, work: Path, records: list, plan, BudgetInfeasible) -> None:
    variants = [(b, lin, base.formats, "") for b in BUDGETS]
    variants.append((HEADLINE, linear_subtable(table, lambda c: c.fmt.kind != "nf"), NO_NF4, "_nonf4"))
    for b, sub, formats, suffix in variants:
        cfg = dataclasses.replace(base, budget_bits=b, budget_mb=None, formats=tuple(formats))
        key = f"qs_b{b}{suffix}"
        label = f"quantseal --budget {b} --data-aware" + (" --formats " + ",".join(formats) if suffix else "")
        t1 = time.perf_counter()
        choice = plan(sub, budget_bits=b)
        solve = time.perf_counter() - t1
        records.append(export_plan(sub, cfg, choice, key, label, work,
                                   {"budget": b, "budget_kind": "bits", "solver_seconds": solve,
                                    "formats_allowed": list(formats)}))
        log(f"  {label}: {records[-1]['bits_per_param']:.3f} bits/param")
    for mb in BUDGETS_MB:
        cfg = dataclasses.replace(base, budget_mb=mb)
        key = f"qs_mb{mb:g}"
        label = f"quantseal --budget-mb {mb:g} --data-aware"
        t1 = time.perf_counter()
        try:
            choice = plan(table, budget_mb=mb, formats_label=",".join(base.formats))
        except BudgetInfeasible as exc:
            records.append({"key": key, "label": label, "group": "quantseal", "status": "infeasible",
                            "error": str(exc), "budget": mb, "budget_kind": "mb"})
            log(f"  {label}: {exc}")
            continue
        solve = time.perf_counter() - t1
        records.append(export_plan(table, cfg, choice, key, label, work,
                                   {"budget": mb, "budget_kind": "mb", "solver_seconds": solve,
                                    "formats_allowed": list(base.formats)}))
        log(f"  {label}: {records[-1]['bits_per_param']:.3f} bits/param, embedding {records[-1]['embedding_format']}")


# ----------------------------------------------------------------------------- measuring
def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feed_for(sess, enc: dict) -> dict:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in enc.items() if k in names}


def ort_embed(path: str, tok, texts: list[str], threads: int = 2, batch: int = 32) -> np.ndarray:
    """Embeddings in the order of ``texts``; batches of similar length (less padding to compute)."""
    s = session(path, threads)
    order = sorted(range(len(texts)), key=lambda i: len(tok.encode_ids(texts[i])))
    parts = []
    for i in range(0, len(order), batch):
        parts.append(s.run(None, feed_for(s, tok([texts[j] for j in order[i:i + batch]])))[0])
    out = np.empty_like(np.concatenate(parts))
    out[order] = np.concatenate(parts)
    return out


def latency_inputs(tok, texts: list[str], batch: int) -> dict:
    """``batch`` rows of 128 real tokens: consecutive evaluation sentences joined until a row holds
    at least 128 tokens, then truncated to 128 (mask all ones)."""
    rows, i = [], 0
    while len(rows) < batch:
        parts = []
        while len(tok.encode_ids(" ".join(parts))) < SEQ:
            parts.append(texts[i % len(texts)])
            i += 1
        rows.append(" ".join(parts))
    enc = tok(rows, pad_to=SEQ)
    assert enc["input_ids"].shape == (batch, SEQ) and enc["attention_mask"].all()
    return enc


def measure_latency(models: list[dict], feeds: dict[int, dict], threads_list, reps: dict[int, int],
                    warmup: dict[int, int]) -> dict:
    """``{threads: {batch: {key: [seconds...]}}}``; round-robin over the models each repetition."""
    out: dict = {}
    for threads in threads_list:
        sessions = {m["key"]: session(m["path"], threads) for m in models}
        out[threads] = {}
        for batch, enc in feeds.items():
            f = {k: feed_for(s, enc) for k, s in sessions.items()}
            la0 = loadavg()
            for k, s in sessions.items():
                for _ in range(warmup[batch]):
                    s.run(None, f[k])
            times = {k: [] for k in sessions}
            for _ in range(reps[batch]):
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, f[k])
                    times[k].append(time.perf_counter() - t)
            out[threads][batch] = {"times": times, "loadavg_start": la0, "loadavg_end": loadavg()}
            log(f"  latency threads={threads} batch={batch}: done (load {la0} → {loadavg()})")
        del sessions
    return out


def measure_rss(path: str, feed_file: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, path, str(feed_file)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        return {"error": r.stderr[-800:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report
def _get(rows: list[dict], key: str) -> dict | None:
    return next((r for r in rows if r["key"] == key), None)


def done_when(rows: list[dict]) -> dict:
    rtn = _get(rows, "ort_rtn_b32")
    q45, q5125, q15 = _get(rows, "qs_b4.5"), _get(rows, "qs_b5.125"), _get(rows, "qs_mb15")
    ok = lambda r: r is not None and r.get("status") == "ok" and "ort_error" in r  # noqa: E731
    checks: dict = {"reference_baseline": "ort_rtn_b32 (MatMulNBitsQuantizer + RTNWeightOnlyQuantConfig, block 32)"}
    if ok(rtn) and ok(q45):
        checks["b4.5_error_below_ort_rtn_b32"] = q45["ort_error"] < rtn["ort_error"]
        checks["b4.5_file_smaller_than_ort_rtn_b32"] = q45["file_bytes"] < rtn["file_bytes"]
    if ok(rtn) and ok(q5125):
        checks["b5.125_error_at_most_half_ort_rtn_b32"] = q5125["ort_error"] <= 0.5 * rtn["ort_error"]
    if q15 is not None:
        checks["mb15_file_at_most_15MB"] = q15.get("status") == "ok" and q15["file_bytes"] <= 15 * MB
    for r in rows:
        if r["group"] == "quantseal" and r.get("status") == "ok" and "latency" in r:
            for t, lat in r["latency"].items():
                checks.setdefault("latency_b1_seq128_at_most_1.3x_fp32", {}).setdefault(r["key"], {})[t] = \
                    lat["1"]["ratio"] <= 1.3
    if ok(rtn) and ok(q45) and "steady_rss" in q45.get("rss", {}) and "steady_rss" in rtn.get("rss", {}):
        checks["b4.5_steady_rss_at_most_ort_rtn_b32"] = q45["rss"]["steady_rss"] <= rtn["rss"]["steady_rss"]
        for r in rows:
            if r["group"] == "quantseal" and "steady_rss" in r.get("rss", {}):
                checks.setdefault("steady_rss_at_most_ort_rtn_b32", {})[r["key"]] = \
                    r["rss"]["steady_rss"] <= rtn["rss"]["steady_rss"]
    return checks


def _lat(r: dict, threads: str, batch: str) -> str:
    lat = r.get("latency", {}).get(threads, {}).get(batch)
    if not lat:
        return "–"
    return f"{lat['median_s'] * 1000:.0f} (×{lat['ratio']:.2f})"


def render_table(res: dict) -> str:
    rows = res["models"]
    lat = res["latency_meta"]
    c = res["done_when"]
    yn = lambda v: "yes" if v else "**no**"  # noqa: E731
    lines = ["### Exported MiniLM in onnxruntime: quality, size, CPU latency, memory", "",
             f"`{res['command']}` — {res['eval_sentences']} held-out sentences, embedding error = 1 − mean cosine "
             "to float32 **torch**, computed from onnxruntime outputs; bits/param = stored bits of the 36 Linears "
             "(codes, scales, zero points, low-rank factors); file MB = the .onnx file (10⁶ bytes). Latency: "
             f"onnxruntime {res['onnxruntime']} CPU, sequence {SEQ} of real tokens, median of "
             f"{lat['reps']['1']} (batch 1) / {lat['reps']['32']} (batch 32) runs after "
             f"{lat['warmup']['1']}/{lat['warmup']['32']} warm-up, interleaved over the models; "
             "ms (× float32 ONNX in the same run). RSS: fresh process, 1 thread, load + one batch-1 run; steady = "
             "VmRSS after, peak = VmHWM (ru_maxrss carries the parent's RSS across fork/exec, so it is not used). **Shared machine**: " + res["machine"] + f"; load average (1/5/15 min) "
             f"{lat['loadavg_start']} at the start of the latency runs, {lat['loadavg_end']} at the end — other "
             "jobs shared the cores, so absolute times are inflated and ratios are noisy.", "",
             f"Done when (vs {c['reference_baseline']}): "
             f"4.5-bit error below it: {yn(c.get('b4.5_error_below_ort_rtn_b32'))}; "
             f"4.5-bit file smaller: {yn(c.get('b4.5_file_smaller_than_ort_rtn_b32'))}; "
             f"5.125-bit error ≤ half: {yn(c.get('b5.125_error_at_most_half_ort_rtn_b32'))}; "
             f"--budget-mb 15 file ≤ 15 MB: {yn(c.get('mb15_file_at_most_15MB'))}; "
             "4.5-bit batch-1 latency ≤ 1.3× float32: "
             + ", ".join(f"{t} thread{'s' if t != '1' else ''} {yn(v)}"
                         for t, v in c.get("latency_b1_seq128_at_most_1.3x_fp32", {}).get("qs_b4.5", {}).items())
             + f"; 4.5-bit steady RSS ≤ RTN's: {yn(c.get('b4.5_steady_rss_at_most_ort_rtn_b32'))}.", "",
             "| model | bits/param | file MB | ORT error | NN@1 | b1 1T ms | b1 2T ms | b32 1T ms | b32 2T ms | "
             "steady RSS MB | peak RSS MB | formats |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok" or "ort_error" not in r:
            why = r.get("error", "not measured").replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['label']} | – | – | {r.get('status', '?')}: {why[:160]} | | | | | | | | |")
            continue
        bits = f"{r['bits_per_param']:.3f}" if r.get("bits_per_param") is not None else "–"
        rss = r.get("rss", {})
        srss = f"{rss['steady_rss'] / MB:.0f}" if "steady_rss" in rss else "–"
        prss = f"{rss['peak_rss'] / MB:.0f}" if "peak_rss" in rss else "–"
        fm = ""
        if r["group"] == "quantseal":
            fm = ", ".join(f"{k}×{v}" for k, v in r["formats"].items()) + f"; embedding {r['embedding_format']}"
        elif r["group"] == "ort":
            fm = "MatMulNBits×{}{}".format(r["matmulnbits_nodes"], "; GatherBlockQuantized" if r["gather_quantized"]
                                            else "")
            if r.get("note"):
                fm += "; " + r["note"]
        if r.get("same_file_as"):
            fm += f"; byte-identical to {r['same_file_as']}, measured once"
        lines.append(f"| {r['label']} | {bits} | {r['file_bytes'] / MB:.2f} | {r['ort_error']:.5f} | "
                     f"{r['ort_nn_agreement']:.3f} | {_lat(r, '1', '1')} | {_lat(r, '2', '1')} | {_lat(r, '1', '32')} | "
                     f"{_lat(r, '2', '32')} | {srss} | {prss} | {fm} |")
    qtab = res["quantseal_build"]
    probe = res.get("ort_quantizer_on_quantseal_fp32_export", {})
    lines += ["", f"quantseal candidate table (data-aware, Fisher included, embedding planned; {qtab['workers']} "
              f"worker processes): {qtab['candidate_table_seconds']:.1f} s. onnxruntime's quantiser on quantseal's "
              f"own fp32 export wrote {probe.get('matmulnbits_nodes', '?')} MatMulNBits nodes (its weights sit "
              "behind Transpose nodes), hence the torch.onnx float32 baseline. "
              "Plot: `results/export_minilm.png`."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["models"] if r.get("status") == "ok" and "ort_error" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"float32": ("k", "D"), "ort": ("tab:red", "x"), "quantseal": ("tab:blue", "o")}
    for r in rows:
        color, marker = styles[r["group"]]
        mb = r["file_bytes"] / MB
        if r["group"] != "float32":  # float32's error is ~0 (printed in the title), off a log axis
            a1.scatter([mb], [r["ort_error"]], c=color, marker=marker, s=45, zorder=3)
            a1.annotate(r["key"], (mb, r["ort_error"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        lat = r.get("latency", {}).get("1", {})
        for batch, mk in (("1", marker), ("32", "s")):
            if batch in lat:
                a2.scatter([mb], [lat[batch]["ratio"]], c=color, marker=mk, s=40 if batch == "1" else 20,
                           alpha=1.0 if batch == "1" else 0.5, zorder=3)
        if "1" in lat:
            a2.annotate(r["key"], (mb, lat["1"]["ratio"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    a1.set_yscale("log")
    a1.set_xlabel("ONNX file MB")
    a1.set_ylabel("embedding error in onnxruntime (1 − mean cosine to float32 torch)")
    fp = _get(rows, "fp32")
    a1.set_title(f"quality vs file size (blue: quantseal, red: onnxruntime quantiser); float32 ONNX: "
                 f"{fp['file_bytes'] / MB:.1f} MB, error {fp['ort_error']:.1e}", fontsize=9)
    a1.grid(True, which="both", alpha=0.3)
    a2.axhline(1.3, color="gray", ls="--", lw=1)
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_xlabel("ONNX file MB")
    a2.set_ylabel("latency ÷ float32 ONNX (1 thread, seq 128)")
    a2.set_title(f"CPU latency ratio, batch 1 (large markers) and 32 (squares); load {res['latency_meta']['loadavg_start']}",
                 fontsize=9)
    a2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(render_table(res) + "\n")
    log(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.md')}")


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "export_minilm.json")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the built models here (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps-b1", type=int, default=15)
    ap.add_argument("--reps-b32", type=int, default=3)
    ap.add_argument("--warmup-b1", type=int, default=3)
    ap.add_argument("--warmup-b32", type=int, default=1)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--smoke", action="store_true", help="plumbing check: RTN quantseal plans, not the benchmark")
    ap.add_argument("--render", action="store_true", help="only re-render the .md/.png from the JSON")
    args = ap.parse_args()
    if args.render:
        write_outputs(json.loads(args.out.read_text()), args.out)
        return

    import onnxruntime
    import torch

    from quantseal.models import default_model_path, load_model
    from quantseal.quality import embed_texts, embedding_error, nn_agreement
    from quantseal.text import TextTokenizer, pydoc_sentences

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model_path = default_model_path()
    tok = TextTokenizer(model_path)
    texts = pydoc_sentences("evaluation")
    if args.smoke:
        texts = texts[:48]
    float_model, _ = load_model(model_path)
    ref = embed_texts(float_model, tok, texts)
    del float_model
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="export_minilm.")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    res = {"model": "all-MiniLM-L6-v2", "smoke_test_only": args.smoke, "eval_sentences": len(texts), "command": "python benchmarks/export_minilm.py",
           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, shared with other jobs",
           "loadavg_script_start": loadavg()}
    try:
        # -- build
        log("building float32 ONNX and onnxruntime-quantised models")
        fp32 = build_float32(model_path, work / "fp32.onnx")
        rows = [fp32, build_quantseal_fp32(model_path, work, work / "qs_fp32.onnx")]
        probe_path = work / "probe_qs_fp32.onnx"
        try:
            ort_quantize(Path(rows[1]["path"]), probe_path, "DEFAULT", 32, False)
            res["ort_quantizer_on_quantseal_fp32_export"] = {
                "matmulnbits_nodes": onnx_facts(probe_path)["ops"].get("MatMulNBits", 0),
                "file_bytes": probe_path.stat().st_size, "source_file_bytes": Path(rows[1]["path"]).stat().st_size}
        except Exception as exc:
            res["ort_quantizer_on_quantseal_fp32_export"] = {"error": f"{type(exc).__name__}: {exc}"}
        for algo in ORT_ALGOS:
            for block in ORT_BLOCKS:
                for gather in (False, True):
                    rec = build_ort(Path(fp32["path"]), work, algo, block, gather)
                    log(f"  {rec['label']}: {rec['status']} {rec.get('error', '')} {rec.get('note', '')}")
                    rows.append(rec)
        log("building quantseal exports")
        qs_rows, res["quantseal_build"] = build_quantseal(model_path, work, args.workers, args.smoke)
        rows += qs_rows
        seen: dict[str, str] = {}
        for r in rows:
            if r.get("status") == "ok":
                r["file_bytes"] = Path(r["path"]).stat().st_size
                r["sha256"] = hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
                if r["sha256"] in seen:  # byte-identical to a model already in the list: measured once
                    r["same_file_as"] = seen[r["sha256"]]
                else:
                    seen[r["sha256"]] = r["key"]

        # -- quality in onnxruntime
        log("embedding the evaluation text in onnxruntime")
        for r in rows:
            if r.get("status") != "ok" or r.get("same_file_as"):
                continue
            try:
                emb = ort_embed(r["path"], tok, texts)
            except Exception as exc:
                r.update(status="failed", error=f"onnxruntime could not run it: {type(exc).__name__}: {exc}"[:400])
                continue
            r["ort_error"] = embedding_error(ref, emb)
            r["ort_nn_agreement"] = nn_agreement(ref, emb)
            log(f"  {r['key']}: error {r['ort_error']:.5f}")
        runnable = [r for r in rows if r.get("status") == "ok" and "ort_error" in r]
        timed = [r for r in runnable if r["key"] != "qs_fp32"]  # same float graph once folded; spares CPU

        # -- latency
        feeds = {1: latency_inputs(tok, texts, 1), 32: latency_inputs(tok, texts, 2 if args.smoke else 32)}
        reps, warm = {1: args.reps_b1, 32: args.reps_b32}, {1: args.warmup_b1, 32: args.warmup_b32}
        threads_list = [int(t) for t in args.threads.split(",")]
        log(f"latency: {len(timed)} models, threads {threads_list}, reps {reps}")
        la0 = loadavg()
        t_lat = time.perf_counter()
        lat = measure_latency(timed, feeds, threads_list, reps, warm)
        res["latency_meta"] = {"seq": SEQ, "reps": {str(k): v for k, v in reps.items()},
                               "warmup": {str(k): v for k, v in warm.items()}, "threads": threads_list,
                               "loadavg_start": la0, "loadavg_end": loadavg(),
                               "seconds": time.perf_counter() - t_lat,
                               "per_config_loadavg": {f"{t}T_b{b}": {"start": v["loadavg_start"], "end": v["loadavg_end"]}
                                                      for t, d in lat.items() for b, v in d.items()},
                               "inputs": "rows of 128 real tokens (consecutive evaluation sentences joined, truncated)"}
        for r in timed:
            r["latency"] = {}
            for t, d in lat.items():
                r["latency"][str(t)] = {}
                for b, v in d.items():
                    med = float(np.median(v["times"][r["key"]]))
                    ref_med = float(np.median(v["times"]["fp32"]))
                    r["latency"][str(t)][str(b)] = {"median_s": med, "ratio": med / ref_med,
                                                    "times_s": v["times"][r["key"]]}

        # -- memory
        log("RSS probes (fresh process each)")
        feed_file = work / "probe_feed.npz"
        np.savez(feed_file, **feeds[1])
        for r in runnable:
            r["rss"] = measure_rss(r["path"], feed_file)
            r["rss"]["batch"] = 1
        for r in rows:  # byte-identical files share their measurements
            if r.get("same_file_as"):
                src = _get(rows, r["same_file_as"])
                for k in ("ort_error", "ort_nn_agreement", "latency", "rss"):
                    if k in src:
                        r[k] = src[k]
        res["models"] = rows
        res["done_when"] = done_when(rows)
        res["loadavg_script_end"] = loadavg()
        res["total_seconds"] = time.perf_counter() - t_start
        res["workdir"] = str(work) if args.workdir else None
        if tmp is not None:
            for r in rows:
                r.pop("path", None)
    finally:
        if tmp is not None:
            tmp.cleanup()
    write_outputs(res, args.out)


if __name__ == "__main__":
    main()
