"""Where an ONNX graph's initialiser bytes go: a data file written as the graph is built, then
either kept as the model's external data or folded back into one self-contained ``.onnx`` file.

ONNX external data (onnx/docs/ExternalData.md): a ``TensorProto`` with ``data_location =
EXTERNAL`` and ``external_data`` entries ``location`` (a file beside the model), ``offset`` and
``length`` (bytes) instead of ``raw_data``.  :class:`TensorSink` appends each initialiser of at
least :data:`INLINE_BELOW` bytes (onnx's own ``size_threshold``) to one file at an offset aligned to
:data:`ALIGN` bytes (the page size, so a runtime may map it), zero-padding the gaps, and leaves the
proto with the reference only; smaller tensors stay inline.  So a graph builder holds one tensor's
bytes at a time.

:func:`write_single_file` writes the model as one file whose bytes equal
``model.SerializeToString()`` of the same model with every initialiser inline — what
``onnx.save_model`` writes — without building that message: protobuf writes a message's known
fields in field-number order, each length-delimited field as ``tag · varint(length) · bytes``, so
the file is assembled from the small serialised pieces (ModelProto fields 1–6, the ``graph`` field
7 whose length is summed from its parts, fields 8+), copying each tensor's bytes from the data
file in 1 MiB chunks.  Functions here touch only the given files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

ALIGN = 4096
INLINE_BELOW = 1024
PROTOBUF_LIMIT = 2**31 - 1  # a serialised message over 2 GiB cannot be parsed
_CHUNK = 1 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The tag and length prefix of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


class TensorSink:
    """Appends initialisers' raw bytes to ``path`` (named ``location`` in the protos)."""

    def __init__(self, path: Path, location: str):
        self.path, self.location = Path(path), location
        self._f = open(self.path, "wb")
        self.size = 0

    def place(self, t: TensorProto) -> TensorProto:
        """Write ``t``'s ``raw_data`` (≥ :data:`INLINE_BELOW` bytes) to the file and return a new
        proto that refers to it (``t`` itself if it stays inline).  A new one, not ``t`` with the
        field cleared: protobuf frees a message's memory only with the whole message, so a cleared
        ``t`` kept in the graph would still hold its bytes."""
        if not t.HasField("raw_data") or len(t.raw_data) < INLINE_BELOW:
            return t
        offset = self._align()
        self._f.write(t.raw_data)
        t.ClearField("raw_data")
        header = TensorProto()
        header.CopyFrom(t)
        return self._refer(header, offset)

    def place_chunks(self, t: TensorProto, chunks) -> TensorProto:
        """Write the bytes of ``t`` (a proto without data) from ``chunks``, numpy arrays whose
        row-major bytes concatenate to the tensor's, one chunk in memory at a time."""
        offset = self._align()
        for part in chunks:
            self._f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
            self.size = self._f.tell()
        return self._refer(t, offset)

    def _align(self) -> int:
        pad = -self.size % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
        self.size += pad
        return self.size

    def _refer(self, t: TensorProto, offset: int) -> TensorProto:
        self.size = self._f.tell()
        length = self.size - offset
        del t.external_data[:]
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        t.data_location = TensorProto.EXTERNAL
        return t

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def to_external(model: ModelProto, sink: TensorSink) -> None:
    """Move, in place, every large inline initialiser of an in-memory ``model`` to ``sink``."""
    for t in model.graph.initializer:
        placed = sink.place(t)
        if placed is not t:
            t.CopyFrom(placed)


def _inline_size(t: TensorProto) -> tuple[bytes, int, bytes]:
    """``t`` with its external bytes inline, as (fields before raw_data, raw length, fields after)."""
    head, tail = TensorProto(), TensorProto()
    head.CopyFrom(t)
    del head.external_data[:]
    head.ClearField("data_location")
    for f in ("doc_string", "metadata_props"):  # field numbers after raw_data (9)
        head.ClearField(f)
    if t.doc_string:
        tail.doc_string = t.doc_string
    tail.metadata_props.extend(t.metadata_props)
    return head.SerializeToString(), int(external_info(t)["length"]), tail.SerializeToString()


def _split(message, at: int):
    """(a copy of ``message`` with only its fields numbered below ``at``, a copy with only those
    above): the serialised pieces before and after field ``at``."""
    head, tail = type(message)(), type(message)()
    head.CopyFrom(message)
    tail.CopyFrom(message)
    for f in message.DESCRIPTOR.fields:
        (head if f.number >= at else tail).ClearField(f.name)
        if f.number == at:
            tail.ClearField(f.name)
    return head, tail


def write_single_file(model: ModelProto, data_dir: Path, out: Path) -> None:
    """Write ``model`` to ``out`` as one self-contained file, its external initialisers' bytes read
    from their ``location`` under ``data_dir``; byte for byte what ``onnx.save_model`` writes for
    the same model held in memory."""
    data_dir = Path(data_dir)
    inits = list(model.graph.initializer)
    pieces: list[tuple[bytes, TensorProto | None, int, bytes]] = []
    for t in inits:
        if is_external(t):
            head, n, tail = _inline_size(t)
            body = head + _field(9, n)
            pieces.append((_field(5, len(body) + n + len(tail)) + body, t, n, tail))
        else:
            raw = t.SerializeToString()
            pieces.append((_field(5, len(raw)) + raw, None, 0, b""))
    g = model.graph
    g_head, g_tail = _split(g, 5)  # node 1, name 2 | initializer 5 | doc_string 10, input 11, ...
    g_head_b, g_tail_b = g_head.SerializeToString(), g_tail.SerializeToString()
    g_len = len(g_head_b) + len(g_tail_b) + sum(len(p[0]) + p[2] + len(p[3]) for p in pieces)
    m_head, m_tail = _split(model, 7)
    files: dict[str, object] = {}
    try:
        with open(out, "wb") as f:
            f.write(m_head.SerializeToString())
            f.write(_field(7, g_len))
            f.write(g_head_b)
            for prefix, t, n, tail in pieces:
                f.write(prefix)
                if t is not None:
                    info = external_info(t)
                    src = files.get(info["location"])
                    if src is None:
                        src = files[info["location"]] = open(data_dir / info["location"], "rb")
                    src.seek(int(info["offset"]))
                    left = n
                    while left:
                        chunk = src.read(min(_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{data_dir / info['location']}: shorter than {t.name}'s bytes")
                        f.write(chunk)
                        left -= len(chunk)
                f.write(tail)
            f.write(g_tail_b)
            f.write(m_tail.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
    finally:
        for src in files.values():
            src.close()


def save(model: ModelProto, folder: Path, name: str, external: bool) -> list[str]:
    """Write ``model`` as ``folder/name`` (+ ``folder/name.data`` when ``external``); returns the
    names written.  A model whose initialisers already live in ``folder/name.data`` (a
    :class:`TensorSink` there) keeps them there, or is folded into one file (the data file is then
    removed); an in-memory model is written by ``onnx.save_model`` or moved to a new data file."""
    folder = Path(folder)
    data = name + ".data"
    streamed = any(is_external(t) for t in model.graph.initializer)
    if external:
        if not streamed:
            sink = TensorSink(folder / data, data)
            try:
                to_external(model, sink)
            finally:
                sink.close()
        with open(folder / name, "wb") as f:
            f.write(model.SerializeToString())
        return [data, name] if (folder / data).exists() else [name]
    if streamed:
        write_single_file(model, folder, folder / name)
        (folder / data).unlink(missing_ok=True)
    else:
        onnx.save_model(model, str(folder / name))
    return [name]

