"""An onnxruntime session: provider choice with fallback, threads, numpy in and out.

No torch, no transformers, nothing from ``quantseal.compress`` or ``quantseal.export``: a device
needs only onnxruntime and numpy (DESIGN §2, §6).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import BadInput

log = logging.getLogger(__name__)

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_provider(asked: str = "auto", available: list[str] | None = None) -> str:
    """``"cuda"`` or ``"cpu"`` for a request of ``"auto"``, ``"cuda"`` or ``"cpu"``.

    ``auto`` takes CUDA when onnxruntime offers it; ``cuda`` where it does not falls back to CPU
    with a warning."""
    asked = (asked or "auto").lower()
    if asked not in ("auto", "cuda", "cpu"):
        raise BadInput(f"unknown provider {asked!r} (auto, cuda, cpu)")
    available = available_providers() if available is None else available
    has_cuda = PROVIDERS["cuda"] in available
    if asked == "cpu":
        return "cpu"
    if asked == "cuda" and not has_cuda:
        log.warning("CUDA was asked for but onnxruntime offers %s; running on CPU", ", ".join(available) or "nothing")
        return "cpu"
    return "cuda" if has_cuda else "cpu"


class Session:
    """One ONNX model ready to run.

    ``provider``: ``"auto"`` | ``"cuda"`` | ``"cpu"``; after construction ``.provider`` is the one
    in use (``"cuda"`` or ``"cpu"``).  ``threads``: intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"{self.path}: no such model file")
        self.provider = choose_provider(provider)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise BadInput(f"threads must be at least 1, not {threads}")
            opts.intra_op_num_threads = int(threads)
        providers = [PROVIDERS["cpu"]] if self.provider == "cpu" else [PROVIDERS["cuda"], PROVIDERS["cpu"]]
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{self.path}: onnxruntime cannot load it ({first[:300]})") from exc
        if self.provider == "cuda" and PROVIDERS["cuda"] not in self._sess.get_providers():
            log.warning("onnxruntime could not start CUDA for %s; running on CPU", self.path)
            self.provider = "cpu"
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.input_types = {i.name: i.type for i in self._sess.get_inputs()}  # "tensor(float16)", ...
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.metadata = dict(self._sess.get_modelmeta().custom_metadata_map)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run on numpy inputs; feeds the model does not take are ignored, missing ones are a
        :class:`BadInput`.  Returns ``{output name: array}``."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BadInput(f"{self.path}: input {missing[0]!r} is missing (the model takes {self.input_names})")
        names = outputs or self.output_names
        values = self._sess.run(names, {n: feeds[n] for n in self.input_names})
        return dict(zip(names, values))

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, provider={self.provider!r})"
