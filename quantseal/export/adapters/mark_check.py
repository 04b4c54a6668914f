"""Owner-side check that every branch of a marked export with adapters names its customer.

The mark is folded into the token table, which every ``adapter_id`` reads (:mod:`.switchable`),
but an adapter changes the function on top of it: the board's statistic for bit i (the trigger
embeddings' projection on a secret direction for an encoder, the logit gap ``z[a] − z[b]`` of a
target pair for a decoder; :mod:`quantseal.runtime.verify`) is trained on the base model, and an
adapter that moves those quantities by more than the board's margin flips bits.  Measured on the
tiny sharpened LLaMA (32-bit board): a LoRA r=4 on k/o/down with ``lora_B ~ N(0, 0.3²)`` read 4 of
32 bits wrong (owner none); the same adapter at 0.1 reads every bit.

So before an export is published, :func:`check_branches` runs the black-box verification itself
(onnxruntime on the written file, the board's triggers, the registry) once per ``adapter_id`` and
the export is refused, by adapter name, if any branch fails to name the customer at ``alpha``
(or, for a board too small to reach ``alpha`` at all — 16 bits and a few customers give p ≥
3·2⁻¹⁶ — fails to read every bit of the customer's codeword): what ``verify`` would later answer
about a suspect serving that adapter is known before the file leaves the owner.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import Unsupported


def check_branches(model_path: Path, names: list[str], board, key: bytes, registry, customer: str,
                   alpha: float = 1e-6) -> list[dict]:
    """Verify ``model_path`` (a marked export with adapters: switchable, ``names`` its adapters
    in id order, ids 1..J; or folded, ``names`` empty) at every ``adapter_id`` 0..J against ``board`` (a loaded
    :class:`~quantseal.compress.markboard.Board`).  Returns per id ``{"adapter_id", "adapter",
    "owner", "bit_errors", "p_value"}``; raises :class:`Unsupported` naming the first branch whose
    verification does not name ``customer``."""
    from ...runtime.suspect_onnx import pooling_config
    from ...runtime.verify import onnx_embed_fn, onnx_logits_fn, verify
    from ...text import TextTokenizer

    tok = TextTokenizer(board.path)
    decoder = board.manifest.get("family") == "decoder"
    out = []
    for ident, name in enumerate([None, *names]):
        pick = None if ident == 0 else str(ident)  # id 0: also a file without adapters (folded)
        if decoder:
            fn = onnx_logits_fn(model_path, provider="cpu", tokenizer=board.path, adapter=pick)
        else:
            fn = onnx_embed_fn(model_path, provider="cpu", pooling=pooling_config(board.path, board.manifest),
                               adapter=pick)
        res = verify(fn, key, registry, board.manifest, tok, alpha=alpha)
        row = {"adapter_id": ident, "adapter": name, "owner": res["owner"], "bit_errors": int(res["bit_errors"]),
               "p_value": float(res["p_value"])}
        out.append(row)
        exact = res.get("best") == customer and row["bit_errors"] == 0
        if customer not in res["owners"] and not exact:
            what = ("the adapted model" if not names else "the base model") if name is None \
                else f"adapter {name!r} (adapter_id {ident})"
            raise Unsupported(f"{what} hides the watermark: verify reads {row['bit_errors']} of {board.manifest['bits']} "
                              f"bits wrong (p = {row['p_value']:.3g}, owner {res['owner'] or 'none'}), so a suspect "
                              f"serving it would not be traced to {customer}; every branch of a marked switchable "
                              "export must carry the mark (a gentler adapter, or export it unmarked)")
    return out
