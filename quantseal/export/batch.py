"""``quantseal export-batch``: one watermarked export folder per customer, ``DIR/<id>/model.onnx``.

Each folder is exactly what ``quantseal export CK -o DIR/<id>/model.onnx --board B --key K
--registry R --user ID`` writes (the model and its companion files: tokenizer files, and for a
decoder the onnxruntime-genai ``genai_config.json`` that names the model file)
(:func:`quantseal.export.watermark.export_marked`), byte for byte when both are given the same
``--seed`` (the obfuscation seed of customer ``ID`` is :func:`obfuscation_seed` of the seed and the
id, so no two customers share a low-rank tensor).  The customers are independent, so they fan out
(:mod:`quantseal.distributed`):

1. the driver checks every input (customer ids, registry, board, checkpoint) before any work;
2. if the board has no ONNX template for this checkpoint yet, the first customer is exported here,
   which traces the model once and leaves the template in the board folder
   (:func:`~quantseal.export.watermark.template_path`); every other customer is then a template swap;
3. the rest run serially, on a process pool (``--workers``; inputs and outputs by path), or on
   Ray (``--ray``): a few actors each receive the checkpoint folder, the board with its template,
   the key and the registry once through the object store (no shared file system needed), export
   into their own scratch folder and return the files' bytes, which the driver publishes;
4. every customer's folder is published atomically: written in a hidden staging folder under
   ``DIR`` (removed at the end, so a failure leaves only finished folders), then renamed into
   place (replacing an earlier export folder of that customer).  On Ray a dead worker is
   restarted and its customer retried (``max_task_retries``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..distributed import Fanout, fan_out
from ..errors import BadInput

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,199}")
MODEL = "model.onnx"


def obfuscation_seed(seed: int | None, customer: str) -> int | None:
    """The seed of ``customer``'s low-rank obfuscation (:func:`~quantseal.export.watermark.mark_checkpoint`)
    under the run's ``seed``: the first 8 bytes of SHA-256("quantseal-obfuscation\\0<seed>\\0<id>"),
    so each customer gets its own mixing matrices; ``None`` stays ``None`` (fresh OS randomness)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"quantseal-obfuscation\x00{int(seed)}\x00{customer}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def read_customers(path: str | Path) -> list[str]:
    """Customer ids, one per line (blank lines and ``#`` comments skipped); each must be usable as
    a file name (letters, digits, ``._@+=-``, not starting with a dot) and appear once."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such customers file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text ({exc.reason})") from None
    out: list[str] = []
    seen: set[str] = set()
    for n, raw in enumerate(lines, 1):
        cid = raw.strip()
        if not cid or cid.startswith("#"):
            continue
        if not SAFE_ID.fullmatch(cid):
            raise BadInput(f"{path}:{n}: customer id {cid!r} cannot name a file "
                           "(letters, digits and ._@+=- only, not starting with '.')")
        if cid in seen:
            raise BadInput(f"{path}:{n}: customer {cid!r} is listed twice")
        seen.add(cid)
        out.append(cid)
    if not out:
        raise BadInput(f"{path}: no customer ids")
    return out


@dataclass
class Inputs:
    """What one export needs, as paths on the machine that runs it, and where it delivers:
    ``staging`` (a folder beside the outputs: publish there by path) or ``None`` (return bytes)."""

    checkpoint: Path
    board: Path
    key: bytes
    registry: object  # quantseal.registry.RegistryView (or a legacy quantseal.keys.Registry)
    accuracy_level: int
    output: Path | None
    staging: Path | None
    scratch: Path | None = None  # a folder this worker owns (Ray), removed by close()

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _publish_folder(folder: Path, dst: Path) -> None:
    """Rename a finished export folder to ``dst`` (replacing an earlier one)."""
    from ..checkpoint import publish_folder

    os.chmod(folder, 0o755)
    publish_folder(folder, dst)


def _publish_bytes(files: dict[str, bytes], staging: Path, dst: Path) -> None:
    """Write ``name → bytes`` into a new folder in ``staging``, then publish it as ``dst``."""
    folder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=staging))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    _publish_folder(folder, dst)


def export_one(inputs: Inputs, job: tuple[str, int | None]) -> dict:
    """Export customer ``job = (id, obfuscation seed)``; returns its report, plus ``files``
    (name → bytes) when ``inputs.staging`` is None."""
    from .watermark import export_marked

    customer, seed = job
    own = Path(tempfile.mkdtemp(prefix=f".{customer}.", dir=inputs.staging or inputs.scratch))
    try:
        rep = export_marked(inputs.checkpoint, own / MODEL, inputs.board, inputs.key, inputs.registry, customer,
                            accuracy_level=inputs.accuracy_level, seed=seed)
        res = {"customer": customer, "path_taken": rep["path_taken"], "bytes": rep["bytes"],
               "seconds": rep["seconds"]}
        if inputs.staging is None:
            res["files"] = {p.name: p.read_bytes() for p in own.iterdir() if not p.name.startswith(".")}
        else:
            _publish_folder(own, inputs.output / customer)
        return res
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _folder_files(folder: Path, keep=lambda rel: True) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and keep(p.relative_to(folder))}


def bundle_inputs(checkpoint: Path, board: Path, template: Path, key: bytes, registry, accuracy_level: int) -> dict:
    """Everything a remote worker needs, as bytes: the checkpoint folder, the board folder with
    only the template it will use, the key and the registry (owner-side secrets: the object
    store of the owner's own cluster carries them)."""
    board_files = _folder_files(board, lambda rel: rel.parts[0] != "templates" and not rel.name.startswith("."))
    board_files[str(template.relative_to(board))] = template.read_bytes()
    return {"checkpoint": _folder_files(checkpoint, lambda rel: not rel.name.startswith(".")),
            "board": board_files, "key": key, "registry": registry, "accuracy_level": accuracy_level}


def unpack_inputs(bundle: dict) -> Inputs:
    """A Ray actor's set-up: write the shipped folders into a private scratch folder."""
    scratch = Path(tempfile.mkdtemp(prefix="quantseal-batch-"))
    for part in ("checkpoint", "board"):
        for rel, data in bundle[part].items():
            dst = scratch / part / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
    return Inputs(scratch / "checkpoint", scratch / "board", bundle["key"], bundle["registry"],
                  bundle["accuracy_level"], None, None, scratch)


def _local_inputs(inputs: Inputs) -> Inputs:
    return inputs


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


def export_batch(checkpoint, customers_file, out_dir, board, key_path, registry_path, *, accuracy_level: int = 0,
                 seed: int | None = None, fanout: Fanout = Fanout(), progress=None) -> dict:
    """Write ``out_dir/<id>/model.onnx`` for every customer in ``customers_file``; returns the
    ``--json`` report (files, bytes, seconds, customers per minute, how the work ran)."""
    from ..checkpoint import is_checkpoint
    from ..compress.markboard import load_board
    from ..keys import read_key
    from ..registry import open_registry
    from .onnx import _check_output
    from .watermark import template_path

    t0 = time.perf_counter()
    checkpoint, out_dir, board_dir = Path(checkpoint), Path(out_dir), Path(board)
    customers = read_customers(customers_file)
    key = read_key(key_path)
    registry = open_registry(registry_path, key)  # a database, or a legacy JSON registry
    missing = [c for c in customers if c not in registry]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInput(f"not in the registry {registry_path}: {', '.join(missing[:3])}{more}")
    board_manifest = load_board(board_dir).manifest
    if not is_checkpoint(checkpoint):
        raise BadInput(f"{checkpoint}: not a quantseal checkpoint folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"{out_dir}: exists and is not a directory")
    for c in customers:
        _check_output(out_dir / c / MODEL)
        if (out_dir / c).exists() and not (out_dir / c / MODEL).is_file():
            raise BadInput(f"{out_dir / c}: exists and is not an export folder; refusing to replace it")
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # removed again on failure
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".quantseal-batch.", dir=out_dir))
    except OSError as exc:
        _remove_empty(created)
        raise BadInput(f"{out_dir}: cannot write there ({exc.strerror})") from None
    tick = progress(len(customers), "export") if progress is not None else (lambda n=1: None)
    jobs = [(c, obfuscation_seed(seed, c)) for c in customers]
    local = Inputs(checkpoint, board_dir, key, registry, accuracy_level, out_dir, staging)
    reports: list[dict] = []
    try:
        template = template_path(board_dir, board_manifest, accuracy_level)
        if not template.is_file():  # trace once here; every other customer swaps into the template
            reports.append(export_one(local, jobs[0]))
            jobs = jobs[1:]
            tick(1)
        if fanout.ray is None:
            reports += fan_out(export_one, jobs, fanout, tick, setup=_local_inputs, shared=local)
        else:
            def publish(i: int, rep: dict) -> dict:  # as each arrives: write it, keep only the report
                _publish_bytes(rep.pop("files"), staging, out_dir / rep["customer"])
                return rep

            bundle = bundle_inputs(checkpoint, board_dir, template, key, registry, accuracy_level)
            reports += fan_out(export_one, jobs, fanout, tick, setup=unpack_inputs, shared=bundle, collect=publish)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)  # the folders this run made, if still empty: nothing half-written
        raise
    shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"output_dir": str(out_dir), "customers": len(customers), "fanout": fanout.describe(),
            "files": [str(out_dir / r["customer"] / MODEL) for r in reports],
            "bytes": sum(r["bytes"] for r in reports),
            "traced": sum(r["path_taken"] == "traced" for r in reports),
            "seconds": round(seconds, 3), "customers_per_minute": round(60 * len(customers) / seconds, 2),
            "seeded": seed is not None}
