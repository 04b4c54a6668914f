"""A small ONNX graph builder with scoped node names (in the manner of onnxscript's builder).

Stored tensors keep the names the checkpoint gives them (``model.layers.0.mlp.up_proj.qweight``),
so a template swap or an inspection finds them; intermediate values are named by the scope they
are built in (``/model/layers.3/attn/GroupQueryAttention/output_0``, the convention of
onnxruntime-genai's builder).  Arrays and names in, protos out; with a ``sink``
(:class:`~.external_data.TensorSink`) each initialiser's bytes are written out as it is added.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from .lowbit import MS_DOMAIN, Nodes, header_proto


_RAW_DTYPES = frozenset(np.dtype(d) for d in (np.float32, np.float16, np.float64, np.uint8, np.int8, np.int32, np.int64))


def _direct(array) -> bool:
    """Whether ``array``'s bytes are what ``numpy_helper.from_array`` puts in ``raw_data`` (a
    plain numeric dtype) and big enough to leave the proto (≥ :data:`~.external_data.INLINE_BELOW`)."""
    from .external_data import INLINE_BELOW

    a = np.asarray(array)
    return a.dtype in _RAW_DTYPES and a.dtype.byteorder in ("=", "<", "|") and a.nbytes >= INLINE_BELOW


class GraphBuilder:
    """Nodes and initialisers in topological order, with a stack of name scopes."""

    def __init__(self, dtype=np.float32, sink=None):
        self.dtype = dtype  # the compute type: float32, or float16 for a CUDA graph
        self.sink = sink  # where initialiser bytes go (external_data.TensorSink), or None: inline
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._scope: list[str] = []
        self._count: Counter = Counter()

    @contextlib.contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def prefix(self) -> str:
        """The current scope as a name prefix ('/model/layers.0/attn')."""
        return "/" + "/".join(self._scope) if self._scope else ""

    def init(self, name: str, array: np.ndarray) -> str:
        """An initialiser under exactly ``name`` (a checkpoint tensor name, or a constant's)."""
        if name in self._names:
            raise ValueError(f"initialiser {name!r} added twice")
        self._names.add(name)
        if hasattr(array, "chunks"):  # a large stored tensor read in chunks (export/stored.py)
            self._add(header_proto(name, array), array)
        elif self.sink is not None and _direct(array):  # bytes straight to the sink, never in a proto
            self._add(header_proto(name, array), [np.ascontiguousarray(array)])
        else:
            self._add(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _add(self, t: TensorProto, chunked=None) -> None:
        """Keep ``t``; its bytes go to the sink when there is one.  ``chunked``: the tensor whose
        bytes ``t`` (a header) stands for, copied chunk by chunk (or whole, without a sink)."""
        if chunked is not None:
            if self.sink is not None:
                self.sink.place_chunks(t, chunked if isinstance(chunked, list) else chunked.chunks())
            else:
                t.raw_data = np.ascontiguousarray(np.asarray(chunked)).tobytes()
        elif self.sink is not None:
            t = self.sink.place(t)
        self.initializers.append(t)

    def const(self, label: str, array) -> str:
        """A small constant (shapes, axes) shared across the graph by value."""
        arr = np.asarray(array)
        name = f"/constants/{arr.dtype}/{label}"
        if name not in self._names:
            self.init(name, arr)
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Add one node; returns its output name (or the list of them when ``outputs`` > 1).
        ``outputs`` may also give explicit names ("" for an unused optional output)."""
        base = f"{self.prefix()}/{op_type}"
        self._count[base] += 1
        node_name = base if self._count[base] == 1 else f"{base}_{self._count[base] - 1}"
        if isinstance(outputs, int):
            names = [f"{node_name}/output_{i}" for i in range(outputs)]
        else:
            names = list(outputs)
        self.nodes.append(helper.make_node(op_type, inputs, names, name=node_name, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def ms(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs):
        """A com.microsoft contrib op."""
        return self.op(op_type, inputs, outputs, domain=MS_DOMAIN, **attrs)

    def extend(self, g: Nodes) -> None:
        """Take the nodes and initialisers of a :class:`~quantseal.export.lowbit.Nodes` rewrite."""
        for t in g.initializers:
            if t.name in self._names:
                raise ValueError(f"initialiser {t.name!r} added twice")
            self._names.add(t.name)
        self.nodes.extend(g.nodes)
        for t in g.initializers:
            self._add(t, g.pending.get(t.name))

    def cast_float(self, x: str, dtype) -> str:
        """``x`` (of float type ``dtype``) in the graph's compute type (:attr:`dtype`)."""
        if np.dtype(dtype) == np.dtype(self.dtype):
            return x
        return self.op("Cast", [x], to=TensorProto.FLOAT if self.dtype == np.float32 else TensorProto.FLOAT16)
