"""Does a float block offset (``int4f``, w = s·q + m) help a float-trained encoder?  all-MiniLM-L6-v2.

Every Linear round-to-nearest in one format (``quantseal compress --method rtn --budget 16 --formats
F``: the budget admits every candidate, so each matrix takes F), exported to ONNX (the int4f encoder
graph: MatMulNBits + the block-sum correction), embedded by onnxruntime on the held-out half of
``pydoc_data.topics``, against the float32 model's embeddings (DESIGN §7):

    embedding error = 1 − mean cosine(compressed, float32),   NN@1 agreement

int4 (integer zero point) and int4f at blocks 32, 64 and 128, with their stored bits per weight.

    .venv/bin/python benchmarks/int4f_minilm.py      # writes results/int4f_minilm.json

Not a test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("int4_b32", "int4f_b32", "int4_b64", "int4f_b64", "int4_b128", "int4f_b128")


def main() -> None:
    from quantseal.cli import main as cli
    from quantseal.compress.formats import FormatSpec
    from quantseal.models import default_model_path, load_model
    from quantseal.quality import embed_texts, embedding_error, nn_agreement
    from quantseal.runtime.pipelines import Embedder
    from quantseal.text import TextTokenizer, pydoc_sentences

    torch.set_num_threads(1)
    texts = pydoc_sentences("evaluation")[:256]
    src = default_model_path()
    model, _ = load_model(src)
    ref = embed_texts(model, TextTokenizer(src), texts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            ck, onnx = Path(tmp) / f"{fmt}.ck", Path(tmp) / fmt / "model.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli(["compress", "-o", str(ck), "--method", "rtn", "--budget", "16", "--formats", fmt,
                            "--workers", "1", "--json"]) == 0
                assert cli(["export", str(ck), "-o", str(onnx), "--json"]) == 0
            emb = Embedder(onnx, provider="cpu").embed(texts)
            spec = FormatSpec.parse(fmt)
            row = {"format": fmt, "bits_per_weight": spec.stored_bytes(384, 384) * 8 / (384 * 384),
                   "embedding_error": round(embedding_error(ref, emb), 6), "nn_at_1": round(nn_agreement(ref, emb), 4),
                   "file_mb": round(onnx.stat().st_size / 1e6, 3)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "int4f_minilm", "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "load_avg": os.getloadavg(), "eval_sentences": len(texts), "rows": rows}
    (RESULTS / "int4f_minilm.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
