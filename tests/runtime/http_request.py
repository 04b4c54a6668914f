"""One HTTP request to a ``quantseal serve`` endpoint, and a server run in a thread (shared by the server tests; tests/runtime is
on sys.path under pytest's default import mode)."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, decoded JSON body) of ``method path`` on ``http://host:port``."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@contextlib.contextmanager
def served_in_thread(server):
    """Serve ``server`` (:func:`quantseal.runtime.server.make_server`) from a daemon thread;
    yields its ``http://127.0.0.1:PORT`` and shuts it down afterwards."""
    from quantseal.runtime.server import server_url

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_url(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
