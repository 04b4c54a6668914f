"""One HTTP request to a ``quantseal serve`` endpoint (shared by the server tests; tests/runtime is
on sys.path under pytest's default import mode)."""

from __future__ import annotations

import http.client
import json


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
