"""A bounded load test of `tightrope serve` on 127.0.0.1: latency, errors and the server's memory.

    python benchmarks/serve_load.py runs/minilm-imdb-bundle --requests 20000 --clients 8 --bad-every 50 \\
        --json runs/serve-load.json

Starts `tightrope serve BUNDLE` as a child process listening on 127.0.0.1 only (a free port), waits
for GET /health, then ``--clients`` threads, each on its own keep-alive connection, send
``--requests`` POST /predict requests in all. Good requests carry one IMDB test review (cut to
``--chars`` characters; the model truncates to its own max length anyway); every ``--bad-every``-th
request is bad instead, cycling through an empty text, a 1 MB text, malformed JSON, a wrong field
and a batch above the server's limit, and must get its 4xx.

Reports p50 / p99 latency of good and bad requests (client-side, connection reused), good requests
that did not get 200 (must be 0), bad requests that did not get their 4xx (must be 0), and the
server's RSS (from /proc) after start-up, after the first 1% of the run (warm), and at the end,
with its peak, sampled every 0.2 s. It stops by itself: after the last request or ``--deadline-s``,
whichever comes first, the server gets SIGINT, then SIGKILL 10 s later.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"  # the only address this script talks to or makes the server listen on
ROOT = Path(__file__).resolve().parents[1]


def imdb_texts(n: int, chars: int) -> list[str]:
    data = Path(os.environ.get("TIGHTROPE_DATA_DIR", ROOT.parent / "shared" / "data")) / "imdb" / "test.jsonl.gz"
    if not data.is_file():
        return [f"review {i}: a film that was {'wonderful' if i % 2 else 'awful'} from start to end" for i in range(n)]
    out = []
    with gzip.open(data, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"][:chars])
            if len(out) == n:
                break
    return out


def bad_requests(max_batch: int) -> list[tuple[str, bytes, int]]:
    """(name, body, expected status) of each kind of bad request, cycled through."""
    return [
        ("empty text", json.dumps({"text": ""}).encode(), 422),
        ("1 MB text", json.dumps({"text": "a" * 1_000_000}).encode(), 413),
        ("malformed JSON", b'{"text": "unterminated', 400),
        ("wrong field", json.dumps({"review": "great"}).encode(), 422),
        ("batch above the limit", json.dumps({"texts": ["great"] * (max_batch + 1)}).encode(), 413),
    ]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="a bundle folder (tightrope export)")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--bad-every", type=int, default=50)
    ap.add_argument("--chars", type=int, default=400, help="cut each review to this many characters")
    ap.add_argument("--threads", type=int, default=None, help="the server's ONNX Runtime threads (default: all cores)")
    ap.add_argument("--concurrency", type=int, default=1, help="the server's model runs at once")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--deadline-s", type=float, default=1800, help="stop sending after this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    if min(args.requests, args.clients, args.bad_every) < 1:
        raise SystemExit("--requests, --clients and --bad-every must be at least 1.")

    texts = imdb_texts(1000, args.chars)
    bad = bad_requests(args.max_batch)
    port = free_port()
    cmd = [sys.executable, "-c", "from tightrope.cli import app; app()", "serve", args.bundle, "--host", HOST,
           "--port", str(port), "--max-batch", str(args.max_batch), "--concurrency", str(args.concurrency)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    report: dict = {"bundle": args.bundle, "requests": args.requests, "clients": args.clients, "bad_every": args.bad_every,
                    "chars": args.chars, "server_threads": args.threads or os.cpu_count(), "concurrency": args.concurrency}
    lock = threading.Lock()
    next_index = [0]
    good_ms: list[float] = []
    bad_ms: list[float] = []
    good_errors: list[str] = []
    bad_errors: list[str] = []
    peak = [0.0]
    stop = threading.Event()
    try:
        report["startup_s"] = round(wait_healthy(port, server, 300), 2)
        report["rss_mb_start"] = round(rss_mb(server.pid), 1)
        deadline = time.perf_counter() + args.deadline_s

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(server.pid))
                stop.wait(0.2)

        def client():
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            while time.perf_counter() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= args.requests:
                        return
                    next_index[0] += 1
                    if i == args.requests // 100:
                        report["rss_mb_warm"] = round(rss_mb(server.pid), 1)
                is_bad = (i + 1) % args.bad_every == 0
                if is_bad:
                    name, body, expected = bad[(i // args.bad_every) % len(bad)]
                else:
                    name, body, expected = "good", json.dumps({"text": texts[i % len(texts)]}).encode(), 200
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
                    response = conn.getresponse()
                    payload = response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as err:
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=60)
                    status, payload = -1, repr(err).encode()
                ms = 1000 * (time.perf_counter() - t0)
                with lock:
                    (bad_ms if is_bad else good_ms).append(ms)
                    if status != expected:
                        (bad_errors if is_bad else good_errors).append(f"{name}: {status} {payload[:120]!r}")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t_start = time.perf_counter()
        workers = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=args.deadline_s + 120)
        wall = time.perf_counter() - t_start
        stop.set()
        report.update({
            "sent": len(good_ms) + len(bad_ms), "wall_s": round(wall, 1),
            "requests_per_s": round((len(good_ms) + len(bad_ms)) / wall, 1),
            "good": len(good_ms), "good_p50_ms": round(percentile(good_ms, 50), 1),
            "good_p99_ms": round(percentile(good_ms, 99), 1),
            "good_mean_ms": round(statistics.fmean(good_ms), 1) if good_ms else None,
            "good_errors": len(good_errors), "bad": len(bad_ms), "bad_p50_ms": round(percentile(bad_ms, 50), 1),
            "bad_p99_ms": round(percentile(bad_ms, 99), 1), "bad_not_refused_as_expected": len(bad_errors),
            "examples_of_errors": (good_errors + bad_errors)[:5],
            "rss_mb_end": round(rss_mb(server.pid), 1), "rss_mb_peak": round(peak[0], 1),
            "server_alive_at_end": server.poll() is None,
            "stopped_by_deadline": len(good_ms) + len(bad_ms) < args.requests,
        })
    finally:
        stop.set()
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
