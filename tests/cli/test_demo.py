"""`make demo` runs `python -m cli.demo`: it must keep working end to end (small collection here), and end by
serving the API with a read key and a curl line that work as printed."""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cli.demo import main
from tests.processes import stop

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_indexes_and_searches_a_shapes_collection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--root", str(tmp_path / "demo"), "--scenes", "40", "--no-serve"])
    out = capsys.readouterr().out
    assert "indexed 40 images" in out
    assert out.count('search "') >= 3
    assert "match" in out
    assert "serving" not in out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl_request(line: str) -> tuple[str, dict[str, str], str]:
    """The URL, headers and body of the demo's `curl -s URL -H ... -d BODY` line."""
    words = shlex.split(line)
    assert words[:2] == ["curl", "-s"], line
    url, headers, body = words[2], {}, ""
    for flag, value in zip(words[3::2], words[4::2], strict=True):
        if flag == "-H":
            name, _, text = value.partition(":")
            headers[name.strip()] = text.strip()
        else:
            assert flag == "-d", line
            body = value
    return url, headers, body


def test_demo_serves_the_api_and_its_printed_curl_finds_hits(tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLSEARCH_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-u", "-m", "cli.demo", "--root", str(tmp_path / "demo"), "--scenes", "24"]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=tmp_path,  # the demo needs nothing from the working directory
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout

    def drain() -> None:  # the server logs every request on stdout: keep the pipe from filling
        for line in stdout:
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.lstrip().startswith("curl ") for line in output):
            assert process.poll() is None and time.monotonic() < deadline, "".join(output)
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=0.5))
        text = "".join(output)
        assert f"serving the page and the API on http://127.0.0.1:{port}/" in text
        key = next(line.rsplit(": ", 1)[1].strip() for line in output if line.startswith("read key"))
        url, headers, body = curl_request(next(line for line in output if line.lstrip().startswith("curl ")))
        assert headers["X-API-Key"] == key and url == f"http://127.0.0.1:{port}/v1/search"

        with httpx.Client(timeout=60) as client:
            while True:
                assert process.poll() is None and time.monotonic() < deadline, text
                try:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            answer = client.post(url, headers=headers, content=body)
            assert answer.status_code == 200, answer.text
            hits = answer.json()["hits"]
            assert len(hits) == 5 and all(hit["path"] for hit in hits)
            assert answer.json()["collection"] == "shapes"
            # The demo's API is not open: the printed key is what lets the request in.
            assert client.post(url, headers={"Content-Type": "application/json"}, content=body).status_code == 401
            page = client.get(f"http://127.0.0.1:{port}/")  # and the page, which asks for that key
            assert page.status_code == 200 and 'id="api-key"' in page.text
    finally:
        stop(process, timeout=20)
    assert process.returncode in (0, -signal.SIGTERM)  # shut down on SIGTERM (uvicorn re-raises it once done)
