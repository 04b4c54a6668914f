"""The owner's customer registry as a database, with an HMAC on every row.

DESIGN §8 "Registry is a database".  The database is an SQLite file (standard library, mode 0600)
or a PostgreSQL server (a ``postgresql://`` URL; :mod:`quantseal.registry_store`).  It holds

* ``registry_meta`` (one row): schema, codeword length ``bits``, ``min_distance``, the key's public id, the
  number of customer rows ``rows``, and ``mac`` = HMAC(key, "registry-db/meta", those fields);
* ``registry_customers``: ``seq`` (1, 2, ... without gaps, in the order customers were added), ``id``,
  ``codeword`` (hex, ``bits`` bits), ``status`` (``active`` | ``removed``) and ``mac`` =
  HMAC(key, "registry-db/row", seq, id, codeword, status, bits, key id).

Every read checks the meta MAC, the row count and every row's MAC (compare_digest): an edited,
swapped, inserted or deleted row, or a database opened with another key, is a
:class:`~quantseal.errors.BadInput` naming the row.  (A whole-file rollback to an older copy made
with the same key cannot be detected by MACs; back the file up, don't trust its age.)

Every change is one transaction that takes the writer lock first (SQLite: ``BEGIN IMMEDIATE`` in
WAL mode with a busy timeout; PostgreSQL: an advisory transaction lock), so concurrent writers
(processes, machines) serialise: an ``add`` reads every committed row, draws the new
codeword against all of them (:meth:`quantseal.keys.Registry.add`: the first HMAC(key, id,
attempt) candidate at distance ≥ ``min_distance`` from every existing codeword, removed ones
included) and commits, or waits for the writer before it.  No customer is lost, no two codewords
conflict.

``remove`` keeps the row as a tombstone: the id is never handed out again, its codeword stays
reserved, and verification still compares a suspect against it (a model exported before the
removal is still attributable), but export refuses it.

Customer ids: 1–128 characters from ``[A-Za-z0-9._@+-]``, the first a letter or digit
(:data:`CUSTOMER_ID`: printable ASCII only, no spaces, quotes, slashes or control characters, never
``.``/``..``, so an id is also a safe file name and shell word); codewords:
16–1024 bits, a multiple of 8.

The JSON registry of earlier versions (:class:`quantseal.keys.Registry`) is still read by
``export`` and ``verify`` (:func:`open_registry`), read-only; ``registry add``/``remove`` refuse it
with a pointer to ``quantseal registry import OLD.json NEW.db``, which copies it (codewords
unchanged, order kept).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import keys as qkeys
from .errors import BadInput
from .registry_store import SQLiteStore, Store, is_sqlite, is_url, store_for

DB_SCHEMA = 1
CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
MIN_BITS, MAX_BITS = 16, 1024
ACTIVE, REMOVED = "active", "removed"

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS registry_meta (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    schema INTEGER NOT NULL, bits INTEGER NOT NULL, min_distance INTEGER NOT NULL,
    key_id TEXT NOT NULL, rows INTEGER NOT NULL, mac TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS registry_customers (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, codeword TEXT NOT NULL,
    status TEXT NOT NULL, mac TEXT NOT NULL);
"""


# ----------------------------------------------------------------------------- validation
def check_customer_id(customer) -> str:
    """``customer`` if it is 1–128 characters of ``[A-Za-z0-9._@+-]`` starting with a letter or
    digit (so an id is also a safe file name: no ``.``, ``..``, hidden or option-like ids), else a
    :class:`BadInput`."""
    if not isinstance(customer, str) or not CUSTOMER_ID.fullmatch(customer):
        shown = customer if isinstance(customer, str) else type(customer).__name__
        raise BadInput(f"customer id {ascii(shown)[:80]}: use 1-128 characters from A-Z a-z 0-9 . _ @ + -, "
                       "starting with a letter or digit")
    return customer


def check_bits(bits) -> int:
    """Codeword length: an integer in [16, 1024], a multiple of 8."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS \
            or bits % 8:
        raise BadInput(f"codeword bits must be a multiple of 8 in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return int(bits)


# ----------------------------------------------------------------------------- MACs
def _row_mac(key: bytes, seq: int, customer: str, codeword: str, status: str, bits: int) -> str:
    data = "\x00".join([str(seq), customer, codeword, status, str(bits), qkeys.key_id(key)]).encode()
    return qkeys._mac(key, "registry-db/row", data).hex()


def _meta_mac(key: bytes, schema: int, bits: int, min_distance: int, kid: str, rows: int) -> str:
    data = "\x00".join(map(str, (schema, bits, min_distance, kid, rows))).encode()
    return qkeys._mac(key, "registry-db/meta", data).hex()


# ----------------------------------------------------------------------------- read-only view
@dataclass(frozen=True)
class Row:
    seq: int
    id: str
    codeword: np.ndarray  # uint8 (bits,)
    status: str


class RegistryView:
    """An authenticated snapshot of the registry with :class:`quantseal.keys.Registry`'s read
    interface (``bits``, ``min_distance``, ``len``, ``in``, ``customers()``, ``codeword()``,
    ``matrix()``), so export and verification take either.

    ``customers()``, ``in`` and ``len`` count active customers; ``codeword()`` refuses a removed
    one; ``matrix()`` has every row, removed ones too (their models may still be out there)."""

    def __init__(self, bits: int, min_distance: int, rows: list[Row], where: str = "registry"):
        self.bits, self.min_distance, self.rows, self.where = bits, min_distance, list(rows), where
        self._by_id = {r.id: r for r in self.rows}

    def __len__(self) -> int:
        return sum(r.status == ACTIVE for r in self.rows)

    def __contains__(self, customer: str) -> bool:
        r = self._by_id.get(customer)
        return r is not None and r.status == ACTIVE

    def customers(self) -> list[str]:
        return [r.id for r in self.rows if r.status == ACTIVE]

    def removed(self) -> list[str]:
        return [r.id for r in self.rows if r.status == REMOVED]

    def row(self, customer: str) -> Row:
        r = self._by_id.get(customer)
        if r is None:
            raise BadInput(f"customer {customer!r} is not in the registry")
        return r

    def codeword(self, customer: str) -> np.ndarray:
        r = self.row(customer)
        if r.status != ACTIVE:
            raise BadInput(f"customer {customer!r} was removed from the registry; its codeword is retired")
        return r.codeword.copy()

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """(ids, uint8 (rows, bits)) of every row in ``seq`` order, removed ones included."""
        ids = [r.id for r in self.rows]
        mat = np.stack([r.codeword for r in self.rows]) if ids else np.zeros((0, self.bits), np.uint8)
        return ids, mat

    def _drawer(self, key: bytes) -> qkeys.Registry:
        """A :class:`quantseal.keys.Registry` holding every row's codeword (removed ones reserved):
        its ``add`` draws the next codeword exactly as a JSON registry would."""
        reg = qkeys.Registry(key, self.bits, self.min_distance)
        for r in self.rows:
            reg._codes[r.id] = r.codeword  # keys.Registry has no public setter; read-only use here
        return reg


# ----------------------------------------------------------------------------- the database
class RegistryDB:
    """The registry database at ``target`` (an SQLite file path, or a ``postgresql://`` URL) under
    ``key``.  Every public method is one transaction."""

    def __init__(self, target, key: bytes, store: Store | None = None):
        qkeys._check_key(key)
        self.store = store if store is not None else store_for(target)
        self.path = self.store.where
        self._key = bytes(key)
        self._kid = qkeys.key_id(key)

    def _q(self, con, sql: str, params=()):
        return con.execute(self.store.sql(sql), params)

    # -- reading under a transaction
    def _meta(self, con) -> tuple[int, int, int] | None:
        """(bits, min_distance, rows) after checking the meta row; None for a fresh database."""
        have = self.store.tables(con)
        if "registry_meta" not in have:
            if "registry_customers" in have or (have and isinstance(self.store, SQLiteStore)):
                raise BadInput(f"{self.path}: a database but not a quantseal registry")
            return None
        got = self._q(con, "SELECT schema, bits, min_distance, key_id, rows, mac FROM registry_meta "
                           "WHERE one = 1").fetchall()
        if not got:
            return None
        schema, bits, mind, kid, rows, mac = got[0]
        if kid != self._kid:
            raise BadInput(f"{self.path}: the registry belongs to another key")
        if not isinstance(mac, str) or not hmac.compare_digest(
                mac, _meta_mac(self._key, schema, bits, mind, kid, rows)):
            raise BadInput(f"{self.path}: registry header failed its integrity check (edited or corrupt); refusing it")
        if schema != DB_SCHEMA:
            raise BadInput(f"{self.path}: registry schema {schema}, expected {DB_SCHEMA}")
        return int(bits), int(mind), int(rows)

    def _view(self, con) -> RegistryView | None:
        meta = self._meta(con)
        if meta is None:
            return None
        bits, mind, n = meta
        rows = []
        for seq, cid, code, status, mac in self._q(
                con, "SELECT seq, id, codeword, status, mac FROM registry_customers ORDER BY seq").fetchall():
            where = f"{self.path}: row {seq} (customer {ascii(cid)[:60]})"
            ok = (isinstance(mac, str) and isinstance(cid, str) and isinstance(code, str) and isinstance(status, str)
                  and hmac.compare_digest(mac, _row_mac(self._key, seq, cid, code, status, bits)))
            if not ok:
                raise BadInput(f"{where} failed its integrity check (edited or corrupt); refusing the registry")
            if seq != len(rows) + 1:
                raise BadInput(f"{self.path}: row {len(rows) + 1} is missing (deleted?); refusing the registry")
            rows.append(Row(seq, cid, qkeys.hex_to_bits(code, bits), status))
        if len(rows) != n:
            raise BadInput(f"{self.path}: {len(rows)} customer rows, the header says {n} (rows deleted or "
                           "added outside quantseal); refusing the registry")
        return RegistryView(bits, mind, rows, str(self.path))

    def _write_meta(self, con, bits: int, mind: int, rows: int) -> None:
        mac = _meta_mac(self._key, DB_SCHEMA, bits, mind, self._kid, rows)
        con.execute(self.store.upsert_meta, (DB_SCHEMA, bits, mind, self._kid, rows, mac))

    def _insert(self, con, view: RegistryView, customer: str, code: np.ndarray, status: str = ACTIVE) -> Row:
        seq = len(view.rows) + 1
        hexcode = qkeys.bits_to_hex(code)
        self._q(con, "INSERT INTO registry_customers (seq, id, codeword, status, mac) VALUES (?, ?, ?, ?, ?)",
                (seq, customer, hexcode, status, _row_mac(self._key, seq, customer, hexcode, status, view.bits)))
        row = Row(seq, customer, np.asarray(code, np.uint8).copy(), status)
        view.rows.append(row)
        view._by_id[customer] = row
        return row

    def _run(self, write: bool, fn, create: bool = False):
        """Run ``fn(con)`` in one transaction; commit when ``write``, else roll back."""
        con = self.store.connect(create)
        try:
            self.store.begin(con, write)
            try:
                out = fn(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT" if write else "ROLLBACK")
            return out
        except self.store.errors as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{self.path}: registry database error ({first})") from exc
        finally:
            con.close()

    def _ensure(self, con, bits: int | None) -> RegistryView:
        view = self._view(con)
        if view is None:
            b = check_bits(bits if bits is not None else qkeys.DEFAULT_BITS)
            # one statement at a time: SQLite's executescript would commit the open transaction
            for stmt in filter(str.strip, _SCHEMA_SQL.split(";")):
                con.execute(stmt)
            self._write_meta(con, b, b // 4, 0)
            view = RegistryView(b, b // 4, [], str(self.path))
        elif bits is not None and bits != view.bits:
            raise BadInput(f"{self.path}: registry holds {view.bits}-bit codewords, not {bits}")
        return view

    # -- public API: each call is one transaction
    def snapshot(self) -> RegistryView:
        """Every row, authenticated (a read transaction: a consistent point in time)."""
        view = self._run(False, self._view)
        if view is None:
            raise BadInput(f"{self.path}: an empty registry database (nothing added yet)")
        return view

    def add(self, customer: str, bits: int | None = None) -> tuple[Row, bool]:
        """Register ``customer`` (creating the database with ``bits``-bit codewords when absent);
        returns (its row, whether it is new).  Adding an active customer again returns its row;
        a removed one is refused (ids are never reused)."""
        check_customer_id(customer)
        if bits is not None:
            check_bits(bits)

        def tx(con):
            view = self._ensure(con, bits)
            if customer in view._by_id:
                r = view._by_id[customer]
                if r.status != ACTIVE:
                    raise BadInput(f"customer {customer!r} was removed; ids are never reused")
                return r, False
            code = view._drawer(self._key).add(customer)
            row = self._insert(con, view, customer, code)
            self._write_meta(con, view.bits, view.min_distance, len(view.rows))
            return row, True

        return self._run(True, tx, create=True)

    def remove(self, customer: str) -> Row:
        """Tombstone ``customer``: kept (id and codeword reserved), no longer exportable."""
        check_customer_id(customer)

        def tx(con):
            view = self._view(con)
            if view is None:
                raise BadInput(f"{self.path}: an empty registry database")
            r = view.row(customer)
            if r.status == REMOVED:
                raise BadInput(f"customer {customer!r} is already removed")
            hexcode = qkeys.bits_to_hex(r.codeword)
            self._q(con, "UPDATE registry_customers SET status = ?, mac = ? WHERE seq = ?",
                    (REMOVED, _row_mac(self._key, r.seq, r.id, hexcode, REMOVED, view.bits), r.seq))
            return Row(r.seq, r.id, r.codeword, REMOVED)

        return self._run(True, tx)

    def import_json(self, legacy: qkeys.Registry) -> tuple[int, int]:
        """Copy a loaded JSON registry in, codewords and order unchanged, in one transaction.
        Returns (added, already present).  A customer present with another codeword, a codeword
        closer than ``min_distance`` to one already here, or an id outside the allowed set is
        refused and nothing is written."""
        ids, codes = legacy.matrix()
        for c in ids:
            check_customer_id(c)
        check_bits(legacy.bits)

        def tx(con):
            view = self._ensure(con, legacy.bits)
            if legacy.min_distance != view.min_distance:
                raise BadInput(f"the JSON registry's min_distance {legacy.min_distance} differs from "
                               f"{view.min_distance}")
            added = same = 0
            for c, code in zip(ids, codes):
                if c in view._by_id:
                    if not np.array_equal(view._by_id[c].codeword, code):
                        raise BadInput(f"customer {c!r} is already registered with another codeword")
                    same += 1
                    continue
                _, mat = view.matrix()
                if len(mat) and int(np.min(np.count_nonzero(mat != code, axis=1))) < view.min_distance:
                    raise BadInput(f"customer {c!r}: codeword closer than {view.min_distance} bits to one "
                                   "already registered")
                self._insert(con, view, c, code)
                added += 1
            self._write_meta(con, view.bits, view.min_distance, len(view.rows))
            return added, same

        return self._run(True, tx, create=True)


# ----------------------------------------------------------------------------- entry points
def open_registry(target, key: bytes):
    """A read-only, authenticated registry for export and verification: a database (an SQLite
    file or a ``postgresql://`` URL; :class:`RegistryView`) or a legacy JSON registry file
    (:class:`quantseal.keys.Registry`)."""
    if is_url(str(target)):
        return RegistryDB(str(target), key).snapshot()
    path = Path(target)
    if not path.exists():
        raise BadInput(f"{path}: no such registry")
    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not a registry")
    if is_sqlite(path):
        return RegistryDB(path, key).snapshot()
    return qkeys.Registry.load(path, key)


def import_registry(json_path, db_target, key: bytes) -> tuple[int, int]:
    """``quantseal registry import``: a JSON registry file into a (new or existing) database."""
    json_path = Path(json_path)
    if json_path.is_file() and is_sqlite(json_path):
        raise BadInput(f"{json_path}: already a registry database, not a JSON registry")
    legacy = qkeys.Registry.load(json_path, key)
    return RegistryDB(db_target, key).import_json(legacy)
