"""Search in-process against search through the HTTP API, measured side by side in one run, in interleaved rounds.

    .venv/bin/python bench/api.py [--scenes 2000] [--rounds 5] [--requests 300] [--clients 16] [--client stdlib|httpx]
        [--server-torch-threads N]

On the shipped models (shapes-clip, text queries of the shapes world, k 10), over a generated shapes-world
collection indexed once into a temporary data dir:
(a) `Service.search(Query(...))` called in this process;
(b) `POST /v1/search` against a real `vlsearch serve` subprocess (default options: one uvicorn process, access
    log on) on a free loopback port, from a keep-alive client, the JSON answer parsed: the standard library's
    http.client by default (the least a client adds: the figure is the server's), or httpx (`--client httpx`,
    about half a millisecond of client CPU more a request).
Each with 1 client (in the main thread) and with N concurrent clients (threads, each HTTP one with its own
client), the four runs in rounds a1, b1, aN, bN, a1, ...; latencies are pooled over the rounds for p50 and p99,
the overhead and rate ratios are medians over the rounds with their spread. The server and this process share
the machine's cores: during (b) both run, during (a) the server is idle. CPU time per request (this process, and
the server's from /proc) and the server's own /metrics (time inside the app, time in the search) say where the
HTTP overhead goes; (c) times the app's own work alone: the app driven as ASGI in this process (no network, no
client), its service's search answering one cached result, POST /v1/search against GET /healthz. Torch threads:
each path as it is deployed: in-process torch's own (OMP_NUM_THREADS, else one per core), the server its
VLSEARCH_API_TORCH_THREADS (default 1; `--server-torch-threads 0` gives it torch's own as well).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from core.keys import KeyStore
from core.service import Query, Service
from core.settings import Settings
from models.shapes_world import QUERY_KINDS, generate_scenes, queries, write_collection

REPO_ROOT = Path(__file__).resolve().parent.parent
VLSEARCH = str(Path(sys.executable).parent / "vlsearch")
COLLECTION = "shapes"
K = 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def bench_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        collection=COLLECTION,
        clip_model="shapes-clip",
        clip_pretrained=None,
        device="cpu",
        text_templates=["{}"],
        vlm_model="shapes-vlm",
        vlm_device="cpu",
    )


def server_env(
    data_dir: Path, torch_threads: int | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a `vlsearch serve` (or `vlsearch worker`) on data_dir; extra: more VLSEARCH_ variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLSEARCH_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "VLSEARCH_DATA_DIR": str(data_dir),
            "VLSEARCH_COLLECTION": COLLECTION,
            "VLSEARCH_CLIP_MODEL": "shapes-clip",
            "VLSEARCH_CLIP_PRETRAINED": "none",
            "VLSEARCH_DEVICE": "cpu",
            "VLSEARCH_TEXT_TEMPLATES": '["{}"]',
            "VLSEARCH_VLM_MODEL": "shapes-vlm",
            "VLSEARCH_VLM_DEVICE": "cpu",
        }
    )
    if torch_threads is not None:
        env["VLSEARCH_API_TORCH_THREADS"] = str(torch_threads)
    env.update(extra or {})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(
    data_dir: Path, log: Path, torch_threads: int | None = None, extra: Mapping[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """`vlsearch serve` on a free loopback port, once /readyz answers; its base URL and pid."""
    port = free_port()
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [VLSEARCH, "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=server_env(data_dir, torch_threads, extra),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=base_url, timeout=5) as probe:
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"vlsearch serve did not get ready:\n{log.read_text()[-3000:]}")
                try:
                    if probe.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield base_url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first: [2] is the process group)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def stat_cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds of the process whose process_stat fields these are."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc/<pid>/stat)."""
    return stat_cpu_seconds(process_stat(pid))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, from /proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class Run:
    latencies: list[float]  # seconds per request
    seconds: float  # wall time of the whole run
    own_cpu: float  # CPU seconds of this process during the run
    server_cpu: float  # CPU seconds of the server during the run
    app: float | None = None  # mean seconds inside the server's app per request (its /metrics), HTTP runs only
    search: float | None = None  # mean seconds of those in the route's search (its /metrics)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


def timed_run(
    clients: int, requests: int, make_caller: Callable[[], Callable[[str], None]], texts: list[str], server_pid: int
) -> Run:
    """`requests` calls per client, each client with its own caller: one client in this (the main) thread, as a
    library user calls the service; more from that many threads at once."""
    callers = [make_caller() for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1) if clients > 1 else None

    def client(number: int) -> None:
        call, own = callers[number], latencies[number]
        if start is not None:
            start.wait()
        for index in range(requests):
            text = texts[(number * requests + index) % len(texts)]
            began = time.perf_counter()
            call(text)
            own.append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)] if start else []
    for thread in threads:
        thread.start()
    cpu_before, server_before = own_cpu_seconds(), process_cpu_seconds(server_pid)
    began = time.perf_counter()
    if start is not None:
        start.wait()
        for thread in threads:
            thread.join()
    else:
        client(0)
    seconds = time.perf_counter() - began
    own_cpu, server_cpu = own_cpu_seconds() - cpu_before, process_cpu_seconds(server_pid) - server_before
    for call in callers:
        getattr(call, "close", lambda: None)()
    return Run([value for own in latencies for value in own], seconds, own_cpu, server_cpu)


class HttpCaller:
    """One keep-alive connection: POST /v1/search, the answer checked and parsed (see the docstring for clients)."""

    def __init__(self, base_url: str, key: str, client: str = "stdlib") -> None:
        self.headers = {"X-API-Key": key, "Content-Type": "application/json"}
        if client == "httpx":
            self.client: httpx.Client | None = httpx.Client(base_url=base_url, headers=self.headers, timeout=60)
        else:
            self.client = None
            self.connection = http.client.HTTPConnection(urlsplit(base_url).netloc, timeout=60)

    def __call__(self, text: str) -> None:
        body = json.dumps({"collection": COLLECTION, "text": text, "k": K})
        if self.client is not None:
            answer = self.client.post("/v1/search", content=body)
            status, data = answer.status_code, answer.content
        else:
            self.connection.request("POST", "/v1/search", body=body, headers=self.headers)
            response = self.connection.getresponse()
            status, data = response.status, response.read()
        if status != 200 or len(json.loads(data)["hits"]) != K:
            raise SystemExit(f"POST /v1/search answered {status}: {data[:500]!r}")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        else:
            self.connection.close()


APP_HISTOGRAM = ("vlsearch_http_request_duration_seconds", {"method": "POST", "route": "/v1/search"})
SEARCH_HISTOGRAM = ("vlsearch_search_duration_seconds", {"mode": "clip", "rerank": "false", "captions": "false"})


def server_totals(base_url: str) -> dict[str, tuple[float, float]]:
    """(count, sum of seconds) of the server's request and search histograms for these searches, from /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).raise_for_status().text
    totals = {}
    for family in text_string_to_metric_families(text):
        for name, labels in (APP_HISTOGRAM, SEARCH_HISTOGRAM):
            if family.name == name:
                samples = {
                    sample.name: sample.value
                    for sample in family.samples
                    if all(sample.labels.get(key) == value for key, value in labels.items())
                }
                totals[name] = (samples.get(f"{name}_count", 0.0), samples.get(f"{name}_sum", 0.0))
    return totals


def with_server_means(run: Run, before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> Run:
    """The run, with the server's mean app and search seconds per request over it."""
    means = []
    for name in (APP_HISTOGRAM[0], SEARCH_HISTOGRAM[0]):
        count = after[name][0] - before[name][0]
        means.append((after[name][1] - before[name][1]) / count)
    run.app, run.search = means
    return run


def app_alone(settings: Settings, key: str, text: str, requests: int, rounds: int) -> dict[str, list[float]]:
    """(c) p50 seconds per round of POST /v1/search and GET /healthz through the app alone (see the docstring)."""
    # Run as a script, this file's folder is first on sys.path, and this file (api.py) would shadow the api package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    from api.app import create_app

    app = create_app(settings.model_copy(update={"api_preload": False}))
    body = json.dumps({"collection": COLLECTION, "text": text, "k": K}).encode()

    def scope(method: str, path: str) -> dict[str, object]:
        headers = [(b"host", b"127.0.0.1"), (b"x-api-key", key.encode())]
        if method == "POST":
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
        }  # fmt: skip

    async def request(method: str, path: str) -> None:
        sent = False
        status = 0

        async def receive() -> dict[str, object]:
            nonlocal sent
            if sent:
                await asyncio.Event().wait()  # no disconnect while the app answers
            sent = True
            return {"type": "http.request", "body": body if method == "POST" else b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])  # type: ignore[call-overload]

        await app(scope(method, path), receive, send)  # type: ignore[arg-type]
        if status != 200:
            raise SystemExit(f"{method} {path} answered {status} through the app alone")

    async def measure() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"POST /v1/search": [], "GET /healthz": []}
        async with app.router.lifespan_context(app):
            service = app.state.vlsearch.service
            canned = service.search(Query(text=text, k=K), COLLECTION)
            service.search = lambda query, collection=None: canned  # the route's own work only
            for _ in range(50):
                await request("POST", "/v1/search")
            for _ in range(rounds):
                for name in times:
                    method, path = name.split()
                    spent = []
                    for _ in range(requests):
                        began = time.perf_counter()
                        await request(method, path)
                        spent.append(time.perf_counter() - began)
                    times[name].append(statistics.median(spent))
        return times

    return asyncio.run(measure())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def mean(values: list[float]) -> float:
    return float(np.mean(np.asarray(values)))


def spread(values: list[float], unit: str = "", digits: int = 2) -> str:
    return (
        f"median {statistics.median(values):.{digits}f}{unit} "
        f"(min {min(values):.{digits}f}, max {max(values):.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=2000, help="shapes-world scenes in the collection")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per run with one client")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the second setting")
    parser.add_argument(
        "--server-torch-threads", type=int, default=None, help="VLSEARCH_API_TORCH_THREADS of the server"
    )
    parser.add_argument("--client", choices=("stdlib", "httpx"), default="stdlib", help="the HTTP client library")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    print(
        f"machine: {cores} cores (the server and this process share them), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads in this process, the server's VLSEARCH_API_TORCH_THREADS "
        f"{'default' if args.server_torch_threads is None else args.server_torch_threads}; model shapes-clip; k {K}; "
        f"HTTP client {args.client}"
    )
    texts = [text for kind in QUERY_KINDS for text in queries(kind)]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_collection(generate_scenes("test", args.scenes, seed=3), root / "scenes", size=64)
        settings = bench_settings(root / "data")
        with Service(settings) as service:
            report = service.index([root / "scenes"], COLLECTION).report
            print(f"collection: {report.added} shapes-world scenes (64 px), indexed in {report.seconds:.1f} s")
            key = KeyStore.from_settings(settings).create("read", name="bench").secret

            def in_process() -> Callable[[str], None]:
                def call(text: str) -> None:
                    hits = service.search(Query(text=text, k=K), COLLECTION).hits
                    assert len(hits) == K

                return call

            with server(settings.data_dir, root / "server.log", args.server_torch_threads) as (base_url, pid):
                over_http: Callable[[], Callable[[str], None]] = lambda: HttpCaller(base_url, key, args.client)  # noqa: E731
                for make in (in_process, over_http):  # warm both paths (first searches open and cache things)
                    timed_run(2, 20, make, texts, pid)
                many = max(1, args.requests // args.clients) * 2  # per client: twice the one-client run in all
                settings_runs = {
                    ("in-process", 1): (in_process, 1, args.requests),
                    ("http", 1): (over_http, 1, args.requests),
                    ("in-process", args.clients): (in_process, args.clients, many),
                    ("http", args.clients): (over_http, args.clients, many),
                }
                runs: dict[tuple[str, int], list[Run]] = {name: [] for name in settings_runs}
                busy_before, ours_before = machine_busy_seconds(), own_cpu_seconds() + process_cpu_seconds(pid)
                wall_before = time.perf_counter()
                for number in range(args.rounds):
                    for name, (make, clients, requests) in settings_runs.items():
                        before = server_totals(base_url)
                        run = timed_run(clients, requests, make, texts, pid)
                        if name[0] == "http":
                            run = with_server_means(run, before, server_totals(base_url))
                        runs[name].append(run)
                    one = [runs[(path, 1)][-1] for path in ("in-process", "http")]
                    multi = [runs[(path, args.clients)][-1] for path in ("in-process", "http")]
                    p50_local, p50_http = (percentile(run.latencies, 50) * 1000 for run in one)
                    print(
                        f"round {number + 1}: 1 client p50 {p50_local:.2f} / {p50_http:.2f} ms (overhead "
                        f"{p50_http - p50_local:.2f}), {args.clients} clients {multi[0].rate:.0f} / "
                        f"{multi[1].rate:.0f} req/s (in-process / http)"
                    )
                others = machine_busy_seconds() - busy_before
                others -= own_cpu_seconds() + process_cpu_seconds(pid) - ours_before
                wall = time.perf_counter() - wall_before
            alone = app_alone(settings, key, texts[0], args.requests, args.rounds)
    print(
        f"other processes used {max(others, 0.0):.1f} CPU-s of the {wall * cores:.0f} the {cores} cores had over the "
        f"{wall:.0f} s of the rounds"
    )

    print("(c) the app alone (driven as ASGI in this process, no network; the search answered from a cache), p50:")
    for route, values in alone.items():
        print(f"    {route:<16} per round {spread([value * 1000 for value in values], ' ms', 3)}")

    columns = " ".join(f"{column:>8}" for column in ("requests", "p50 ms", "p99 ms", "req/s"))
    print(f"\n{'path':<11} {'clients':>7} {columns} {'client CPU ms':>14} {'server CPU ms':>14}")
    for (path, clients), done in runs.items():
        latencies = [value for run in done for value in run.latencies]
        count = len(latencies)
        own_cpu = sum(run.own_cpu for run in done) / count * 1000
        server_cpu = sum(run.server_cpu for run in done) / count * 1000
        rate = statistics.median(run.rate for run in done)
        server_column = f"{server_cpu:14.2f}" if path == "http" else f"{'(idle)':>14}"
        print(
            f"{path:<11} {clients:>7} {count:>8} {percentile(latencies, 50) * 1000:>8.2f} "
            f"{percentile(latencies, 99) * 1000:>8.2f} {rate:>8.0f} {own_cpu:>14.2f} {server_column}"
        )
    print("(CPU ms: per request, of this process and of the server process; req/s: median over the rounds)")

    overheads = [
        (percentile(b.latencies, 50) - percentile(a.latencies, 50)) * 1000
        for a, b in zip(runs[("in-process", 1)], runs[("http", 1)], strict=True)
    ]
    ratios = [
        b.rate / a.rate for a, b in zip(runs[("in-process", args.clients)], runs[("http", args.clients)], strict=True)
    ]
    # Means, not medians: the server's histograms give sums and counts only.
    local, remote = runs[("in-process", 1)], runs[("http", 1)]
    in_process_mean = mean([value for run in local for value in run.latencies])
    client_mean = mean([value for run in remote for value in run.latencies])
    app = mean([run.app or 0.0 for run in remote])
    search = mean([run.search or 0.0 for run in remote])
    print("\nwhere a 1-client request's time goes (means; server side from its /metrics), in ms:")
    print(f"  in-process search                          {in_process_mean * 1000:6.2f}")
    print(f"  over HTTP, as the client sees it           {client_mean * 1000:6.2f}, of which")
    print(f"    the search, in the server                {search * 1000:6.2f}")
    print("    the rest of the app (auth, validation,")
    print(f"      thread-pool hops, JSON encoding)       {(app - search) * 1000:6.2f}")
    print(f"    uvicorn, loopback and the client         {(client_mean - app) * 1000:6.2f}")
    pooled = [
        percentile([value for run in runs[(path, 1)] for value in run.latencies], 50) * 1000
        for path in ("in-process", "http")
    ]
    met = sum(overhead <= 2.0 for overhead in overheads)
    print(
        f"HTTP overhead at p50, 1 client: {pooled[1] - pooled[0]:.2f} ms on the pooled p50s; per round "
        f"{spread(overheads, ' ms')}; target <= 2 ms met in {met} of {len(overheads)} rounds"
    )
    print(f"{args.clients} clients: http / in-process requests/s {spread(ratios)} per round, on the same {cores} cores")


if __name__ == "__main__":
    main()
