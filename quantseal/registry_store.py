"""Where the registry database lives: an SQLite file (standard library, the default) or a
PostgreSQL server (``postgresql://`` URL, optional extra ``quantseal[postgres]``: psycopg 3).

Both give :mod:`quantseal.registry` the same thing: a connection in autocommit mode on which it
issues explicit transactions, begun by :meth:`Store.begin` so that writers serialise:

* SQLite: WAL journal, ``synchronous = FULL``, a busy timeout, ``BEGIN IMMEDIATE`` (the write lock
  is taken before the first read, so an ``add`` reads every committed row).  The file is created
  with mode 0600 (its ``-wal``/``-shm`` companions inherit it).
* PostgreSQL: ``BEGIN ISOLATION LEVEL READ COMMITTED`` then a transaction-scoped advisory lock,
  so each later statement sees every row committed before the lock was granted; reads run
  ``REPEATABLE READ READ ONLY`` (one snapshot).

SQL is written with ``?`` placeholders; :meth:`Store.sql` adapts it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import BadInput, Unsupported

BUSY_TIMEOUT_S = 120.0
SQLITE_MAGIC = b"SQLite format 3\x00"
PG_LOCK_ID = 0x5153_5245_4749  # "QSREGI": the advisory lock every registry writer takes
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def is_url(target) -> bool:
    return isinstance(target, str) and bool(_URL.match(target))


def is_sqlite(path: Path) -> bool:
    """True when ``path`` is a file starting with SQLite's header, or an empty file (a database
    another process has just created)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError:
        return False
    return head == SQLITE_MAGIC or head == b""


def sqlite_header_problem(path: Path) -> str | None:
    """What is wrong with an SQLite file's 100-byte header, or None (file format §1.3): the page
    size (a power of two in 512..65536), and, when the header's page count is valid (its
    version-valid-for equals the change counter) and no ``-wal`` file is beside it (a live WAL may
    hold pages the main file lacks), a file that is not that many pages long (truncated or
    padded).  Checked before SQLite opens a file, so a damaged one is refused without SQLite
    leaving ``-wal``/``-shm`` files beside it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if len(head) < 100 or head[:16] != SQLITE_MAGIC:
        return "not an SQLite database (bad header)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return f"not an SQLite database (page size {page})"
    pages = int.from_bytes(head[28:32], "big")
    valid = head[92:96] == head[24:28]
    if valid and pages and not Path(f"{path}-wal").exists() and size != pages * page:
        return f"truncated or damaged: {size} bytes, its header says {pages} pages of {page}"
    return None


class Store:
    where: str
    errors: tuple = ()
    upsert_meta = ""

    def sql(self, text: str) -> str:
        return text

    def connect(self, create: bool):
        raise NotImplementedError

    def begin(self, con, write: bool) -> None:
        raise NotImplementedError

    def tables(self, con) -> set[str]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- SQLite
class SQLiteStore(Store):
    errors = (sqlite3.DatabaseError,)
    upsert_meta = ("INSERT OR REPLACE INTO registry_meta (one, schema, bits, min_distance, key_id, rows, mac) "
                   "VALUES (1, ?, ?, ?, ?, ?, ?)")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = str(self.path)

    def connect(self, create: bool) -> sqlite3.Connection:
        p = self.path
        if p.is_dir():
            raise BadInput(f"{p}: is a folder, not a registry")
        if not p.exists():
            if not create:
                raise BadInput(f"{p}: no such registry")
            if not p.parent.is_dir():
                raise BadInput(f"{p.parent}: no such folder")
            try:  # created 0600 by us (SQLite would use the umask); a racing creator is fine
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise BadInput(f"{p}: cannot create the registry ({exc.strerror})") from exc
        elif not p.is_file():
            raise BadInput(f"{p}: not a regular file")
        if not is_sqlite(p):
            raise BadInput(f"{p}: not a quantseal registry database (a JSON registry? convert it with "
                           f"`quantseal registry import {p} NEW.db --key KEY`)")
        if p.stat().st_size == 0:
            if not create:  # a reader must not turn an empty file into a database
                raise BadInput(f"{p}: an empty registry file (nothing added yet)")
        else:
            problem = sqlite_header_problem(p)
            if problem:
                raise BadInput(f"{p}: {problem}; refusing the registry")
        try:
            con = sqlite3.connect(str(p), timeout=BUSY_TIMEOUT_S, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._wal(con)
            con.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            raise BadInput(f"{p}: not a readable registry database ({exc})") from exc
        return con

    @staticmethod
    def _wal(con: sqlite3.Connection) -> None:
        """Switch to WAL; a concurrent first opener may hold the lock briefly, so retry."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if str(con.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower() == "wal":
                    return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            if time.monotonic() > deadline:
                raise BadInput("registry database stays locked; is another process stuck on it?")
            time.sleep(0.01)

    def begin(self, con, write: bool) -> None:
        con.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def tables(self, con) -> set[str]:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# ----------------------------------------------------------------------------- PostgreSQL
class PostgresStore(Store):
    upsert_meta = ("INSERT INTO registry_meta (one, schema, bits, min_distance, key_id, rows, mac) "
                   "VALUES (1, %s, %s, %s, %s, %s, %s) ON CONFLICT (one) DO UPDATE SET schema = EXCLUDED.schema, "
                   "bits = EXCLUDED.bits, min_distance = EXCLUDED.min_distance, key_id = EXCLUDED.key_id, "
                   "rows = EXCLUDED.rows, mac = EXCLUDED.mac")

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise Unsupported("a postgresql:// registry needs psycopg: pip install 'quantseal[postgres]'") from None
        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.url = url
        self.where = display_name(url)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def connect(self, create: bool):
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        except self._psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{self.where}: cannot connect to the registry database ({first})") from exc

    def begin(self, con, write: bool) -> None:
        if write:
            con.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            con.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_ID,))
        else:
            con.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def tables(self, con) -> set[str]:
        return {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}


def display_name(target) -> str:
    """``target`` as it may be printed: a URL's password replaced by ``***``."""
    text = str(target)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2 and ":" in netloc[0]:
        netloc = [netloc[0].split(":", 1)[0] + ":***", netloc[1]]
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit(parts._replace(netloc="@".join(netloc), query=query))


def store_for(target) -> Store:
    """The store a ``--registry`` argument names: a ``postgresql://`` URL or a file path."""
    if is_url(target):
        scheme = str(target).split(":", 1)[0].lower()
        if scheme in ("postgresql", "postgres"):
            return PostgresStore(str(target))
        raise BadInput(f"{scheme}:// is not a registry location; give a file path or a postgresql:// URL")
    return SQLiteStore(target)
