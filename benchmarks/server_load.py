"""``quantseal serve`` under load: 8 clients × 200 requests on all-MiniLM-L6-v2, then a hostile burst.

The bundled MiniLM is compressed (RTN, 4.5 bits) and exported once into a temporary folder (or
``--model`` names an export), then served by ``quantseal serve`` in its own process.

* **load**: ``--clients`` threads each send ``--requests`` ``POST /embed`` requests, one real
  sentence of ``pydoc_data.topics`` each, back to back, each on a fresh connection (the worst
  case for the HTTP layer).  Recorded: requests per second over the whole run, p50 / p99 latency,
  errors (anything but HTTP 200), and the server's RSS (VmRSS, sampled every 50 ms) before,
  at its peak and after.
* **hostile burst** (issue 11 §5): 300 connections that stall (half send nothing, half half a
  head) and fifteen requests carrying a 1 MB text, while a client sends small requests; recorded:
  their worst latency and the server's RSS before, during and 1 s after the burst.

    python benchmarks/server_load.py            # results/server_load.{json,png}
    python benchmarks/server_load.py --render   # rewrite the .png from the JSON only
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "server_load"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def post(port: int, body: bytes, timeout: float = 60.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/embed", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


class Sampler(threading.Thread):
    """The server's RSS every ``period`` seconds: a list of (t, MB)."""

    def __init__(self, pid: int, t0: float, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.t0, self.period, self.samples = pid, t0, period, []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, rss_mb(self.pid)))
            except (OSError, StopIteration):
                return
            time.sleep(self.period)


def export_minilm(folder: Path) -> Path:
    from quantseal.cli import main
    from quantseal.models import default_model_path

    ck, onnx = folder / "ck", folder / "onnx" / "model.onnx"
    assert main(["compress", str(default_model_path()), "-o", str(ck), "--budget", "4.5", "--method", "rtn",
                 "--workers", "1"]) == 0
    assert main(["export", str(ck), "-o", str(onnx)]) == 0
    return onnx


def load_phase(port: int, pid: int, clients: int, requests: int, sentences: list[str]) -> dict:
    lat = [[] for _ in range(clients)]
    errors = [0] * clients
    t0 = time.monotonic()
    sampler = Sampler(pid, t0)
    sampler.start()

    def client(c: int):
        for i in range(requests):
            body = json.dumps({"texts": [sentences[(c * requests + i) % len(sentences)]]}).encode()
            s = time.monotonic()
            try:
                ok = post(port, body) == 200
            except OSError:
                ok = False
            lat[c].append(time.monotonic() - s)
            errors[c] += not ok

    before = rss_mb(pid)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    time.sleep(0.5)
    sampler.stop.set()
    sampler.join()
    all_lat = np.concatenate([np.asarray(x) for x in lat]) * 1000
    return {"clients": clients, "requests_per_client": requests, "requests": int(all_lat.size),
            "seconds": round(wall, 3), "req_per_s": round(all_lat.size / wall, 2),
            "p50_ms": round(float(np.percentile(all_lat, 50)), 2), "p99_ms": round(float(np.percentile(all_lat, 99)), 2),
            "max_ms": round(float(all_lat.max()), 2), "errors": int(sum(errors)),
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(m for _, m in sampler.samples), 1),
            "rss_after_mb": round(rss_mb(pid), 1), "rss_timeline": [[round(t, 3), round(m, 1)] for t, m in sampler.samples],
            "latency_ms": [round(float(x), 2) for x in all_lat]}


def hostile_phase(port: int, pid: int) -> dict:
    before = rss_mb(pid)
    stalled = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:
            s.sendall(b"POST /embed HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"texts\"")
        stalled.append(s)
    big = json.dumps({"texts": ["word " * 200_000]}).encode()
    codes = []
    burst = [threading.Thread(target=lambda: codes.append(post(port, big))) for _ in range(15)]
    for t in burst:
        t.start()
    small = json.dumps({"texts": ["hi"]}).encode()
    lat, peak = [], before
    for _ in range(20):
        s = time.monotonic()
        assert post(port, small) == 200
        lat.append(time.monotonic() - s)
        peak = max(peak, rss_mb(pid))
    for t in burst:
        t.join()
    for s in stalled:
        s.close()
    time.sleep(1.0)
    return {"stalled_connections": 300, "big_texts": 15, "big_text_status": sorted(set(codes)),
            "small_requests": len(lat), "small_max_ms": round(max(lat) * 1000, 2),
            "small_p50_ms": round(float(np.median(lat)) * 1000, 2), "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(peak, 1), "rss_after_mb": round(rss_mb(pid), 1)}


def render(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = res["load"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(load["latency_ms"], bins=60, color="tab:blue")
    a.axvline(load["p50_ms"], color="k", ls="--", label=f"p50 {load['p50_ms']:.1f} ms")
    a.axvline(load["p99_ms"], color="tab:red", ls="--", label=f"p99 {load['p99_ms']:.1f} ms")
    a.set(xlabel="latency (ms)", ylabel="requests",
          title=f"{load['clients']} clients × {load['requests_per_client']}: {load['req_per_s']:.0f} req/s, "
                f"{load['errors']} errors")
    a.legend()
    t, m = zip(*load["rss_timeline"])
    b.plot(t, m, color="tab:green")
    b.set(xlabel="seconds", ylabel="server RSS (MB)", title="server RSS during the load run")
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an exported MiniLM .onnx (default: compress + export one)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the server")
    ap.add_argument("--workers", type=int, default=4, help="the server's worker threads")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        res = json.loads(OUT.with_suffix(".json").read_text())
        write(res)
        render(res)
        return
    from quantseal.text import pydoc_sentences

    sentences = pydoc_sentences("all")[:2000]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or export_minilm(Path(tmp))
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.Popen([sys.executable, "-m", "quantseal.cli", "serve", str(model), "--port", "0",
                                 "--provider", "cpu", "--threads", str(args.threads), "--workers", str(args.workers)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            url = proc.stdout.readline().strip()
            port = int(url.rsplit(":", 1)[1])
            for _ in range(20):  # warm-up
                post(port, json.dumps({"texts": sentences[:4]}).encode())
            load_avg = [os.getloadavg()[0]]  # the machine is shared: how busy it was
            load = load_phase(port, proc.pid, args.clients, args.requests, sentences)
            load_avg.append(os.getloadavg()[0])
            hostile = hostile_phase(port, proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    res = {"model": "all-MiniLM-L6-v2, RTN 4.5 bits, exported", "server": "quantseal serve (asyncio + worker pool)",
           "onnxruntime_threads": args.threads, "workers": args.workers, "cpus": os.cpu_count(),
           "platform": platform.platform(), "load_average_1min_before_after": [round(x, 2) for x in load_avg],
           "load": load, "hostile": hostile}
    write(res)
    render(res)
    summary = {k: v for k, v in load.items() if k not in ("rss_timeline", "latency_ms")}
    print(json.dumps({"load": summary, "hostile": hostile}, indent=1))


def write(res: dict) -> None:
    """results/server_load.json, atomically; the raw series (latencies, RSS timeline) one line each."""
    series = {k: res["load"][k] for k in ("rss_timeline", "latency_ms")}
    text = json.dumps({**res, "load": {**res["load"], **{k: f"@{k}@" for k in series}}}, indent=1)
    for k, v in series.items():
        text = text.replace(f'"@{k}@"', json.dumps(v, separators=(",", ":")))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, OUT.with_suffix(".json"))


if __name__ == "__main__":
    main()
