"""The safe fetcher: only public addresses are fetched, each one checked before it is connected to.

Hard rule of these tests: nothing connects outside loopback and nothing queries a real DNS server. Every test runs
with a guard on the fetcher's one connect function (it fails on any address outside 127.0.0.0/8 and ::1 and records
the rest) and with a fake resolver; refused addresses outside loopback are only ever named, never reached.
"""

from __future__ import annotations

import io
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from PIL import Image

from indexer import fetch
from indexer.errors import ImageTooLarge, InvalidSetting
from indexer.fetch import AllowList, FetchedImage, FetchFailed, FetchRefused, SafeFetcher, check_address

# A server that should have been cut off but was not tends to hang a test rather than fail it: bound them all.
pytestmark = pytest.mark.timeout(30)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
STREAM_TOTAL = 64 * 1024 * 1024  # what an over-cap stream would send if nobody stopped reading it

# A self-signed certificate for images.example only (not for 127.0.0.1), valid 2020-2120; a test key, trusted nowhere.
CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBcDCCARagAwIBAgIBATAKBggqhkjOPQQDAjAZMRcwFQYDVQQDDA5pbWFnZXMu
ZXhhbXBsZTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAwMDAwMFowGTEXMBUG
A1UEAwwOaW1hZ2VzLmV4YW1wbGUwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQd
wy3+oagdN9hLs0+W+IaFmlJ6kZBM8P5EvJRcodZAocPUTg2bVKTrEbprqMdGIJ4b
BP5s9Gjgv0Ko+eZfT61jo00wSzAPBgNVHRMBAf8EBTADAQH/MBkGA1UdEQQSMBCC
DmltYWdlcy5leGFtcGxlMB0GA1UdDgQWBBTPbNlaE9M9pF46tqiY1PfS+g2kcDAK
BggqhkjOPQQDAgNIADBFAiB9sW3KUzWwrSDjw5IN1HUtO7PwX9pz75XRto2CG9a2
3QIhAJi3Bvq/raIqI0cQi5UvzRLooxmkEB+z/1u0Rp5p1R3E
-----END CERTIFICATE-----
"""
KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgpKtY3MHK+nbCZvSx
eBmWADluxTEJ0GfixqixFglWipehRANCAAQdwy3+oagdN9hLs0+W+IaFmlJ6kZBM
8P5EvJRcodZAocPUTg2bVKTrEbprqMdGIJ4bBP5s9Gjgv0Ko+eZfT61j
-----END PRIVATE KEY-----
"""


# --- the guards every test runs under -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address the fetcher connects to; connecting anywhere outside loopback fails the test."""
    real_connect = fetch._connect
    seen: list[tuple[str, int]] = []

    def guarded(family: int, proto: int, sockaddr: tuple[Any, ...], timeout: float) -> socket.socket:
        ip = ipaddress.ip_address(sockaddr[0])
        seen.append((str(ip), sockaddr[1]))
        if not ip.is_loopback:
            raise AssertionError(f"a test tried to connect outside loopback, to {sockaddr}")
        return real_connect(family, proto, sockaddr, timeout)

    def no_other_path(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("the fetcher must connect only through its checked _connect")

    monkeypatch.setattr(fetch, "_connect", guarded)
    monkeypatch.setattr(socket, "create_connection", no_other_path)
    return seen


class FakeDns:
    """Answers for made-up names (a list of answers is served in turn: the second lookup of a name gets the second
    answer, as a rebinding DNS server would); numeric hosts go to the real resolver, which never queries DNS."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: list[str] = []
        self._real = socket.getaddrinfo

    def add(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    def getaddrinfo(self, host: str, port: int, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> list[Any]:
        if flags & socket.AI_NUMERICHOST:
            return self._real(host, port, family, type, proto, flags)
        self.lookups.append(host)
        answers = self.answers.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        ips = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port, 0, 0)) if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
            for ip in ips
        ]


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


# --- a local HTTP server on 127.0.0.1 -----------------------------------------------------------------------------


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[str] = []
        self.hosts: list[str | None] = []
        self.sni: list[str | None] = []
        self.release = threading.Event()  # set at teardown: every held response lets go
        self.stream_done = threading.Event()
        self.streamed = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        with self.lock:
            self.connections += 1
        return request

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that the fetcher cut off on purpose are not errors


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer
    timeout = 15

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            server.requests.append(self.path)
            server.hosts.append(self.headers.get("Host"))
        path, _, query = self.path.partition("?")
        try:
            self._route(path, query)
        except OSError:
            self.close_connection = True

    def _route(self, path: str, query: str) -> None:
        server = self.server
        if path == "/pixel.png":
            self._send(200, PNG)
        elif path == "/pixel-stream.png":  # the same bytes, no Content-Length: the body ends when the server closes
            self._stream([PNG], chunked=False)
        elif path == "/redirect":
            self._send(302, b"", Location=unquote(query.removeprefix("to=")))
        elif path == "/loop":
            self._send(302, b"", Location="/loop")
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"no image here", content_type="text/plain")
        elif path == "/held-body":  # declares 10 MB, sends none of it until released
            self._head(200, **{"Content-Length": "10000000"})
            server.release.wait(10)
        elif path in ("/stream", "/stream-chunked"):
            self._stream((b"\0" * 65536 for _ in range(STREAM_TOTAL // 65536)), chunked=path == "/stream-chunked")
        elif path == "/slow-headers":
            server.release.wait(10)
        elif path == "/slow-body":
            self._head(200, **{"Content-Length": str(len(PNG))})
            self.wfile.write(PNG[:10])
            server.release.wait(10)
        elif path == "/short":  # promises more than it sends, then closes
            self._head(200, **{"Content-Length": str(len(PNG) + 100)})
            self.wfile.write(PNG)
            self.close_connection = True
        elif path == "/trickle-body":  # one byte every 0.1 s: never silent for a whole read_timeout
            self._head(200, **{"Content-Length": "100000"})
            self._trickle()
        elif path == "/trickle-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            self._trickle()
        else:
            self._send(404, b"not found", content_type="text/plain")

    def _head(self, status: int, content_type: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str = "image/png", **headers: str) -> None:
        self._head(status, content_type, **{"Content-Length": str(len(body)), **headers})
        self.wfile.write(body)

    def _stream(self, pieces: Any, chunked: bool) -> None:
        self.close_connection = True
        self._head(200, **({"Transfer-Encoding": "chunked"} if chunked else {"Connection": "close"}))
        sent = 0
        try:
            for piece in pieces:
                if self.server.release.is_set():
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            self.server.streamed = sent
            self.server.stream_done.set()

    def _trickle(self) -> None:
        for _ in range(100):
            if self.server.release.wait(0.1):
                return
            self.wfile.write(b"x")


def start(server: LocalServer) -> Iterator[LocalServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from start(LocalServer())


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[LocalServer]:
    (tmp_path / "cert.pem").write_text(CERT_PEM)
    (tmp_path / "key.pem").write_text(KEY_PEM)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = LocalServer()
    context.sni_callback = lambda _sock, name, _ctx: server.sni.append(name)  # type: ignore[assignment,func-returns-value]
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from start(server)


def local(**options: Any) -> SafeFetcher:
    """A fetcher allowed to reach the test server on 127.0.0.1 (and nothing else non-public)."""
    return SafeFetcher(allow=["127.0.0.1"], **options)


def assert_one_line(error: BaseException, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message


# --- check_address: a pure function on literal addresses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "unique local"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fec0::1", "site-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "shared"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.2.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("192.0.0.8", "IETF"),
        ("100::1", "discard"),
        ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1, a private"),
        ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, a loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254, a link-local"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("::10.0.0.1", "IPv4-compatible"),
        ("64:ff9b::a00:1", "NAT64 form of 10.0.0.1, a private"),
        ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1, a loopback"),
        ("64:ff9b:1::808:808", "local-use NAT64"),
        ("2002:a00:1::1", "6to4 form of 10.0.0.1, a private"),
        ("2002:7f00:1::", "6to4 form of 127.0.0.1, a loopback"),
        ("2002:a9fe:a9fe::1", "6to4 form of 169.254.169.254"),
        # Teredo: server 65.54.227.120, client 10.0.0.1 stored bit-inverted as f5ff:fffe.
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo address carrying 10.0.0.1"),
    ],
)
def test_check_address_refuses_every_non_public_kind(address: str, kind: str) -> None:
    with pytest.raises(FetchRefused) as refused:
        check_address(address)
    assert refused.value.category == "invalid_input"
    assert_one_line(refused.value, address, kind, "VLSEARCH_FETCH_ALLOW")


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
     "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_check_address_passes_public_addresses_without_touching_the_network(
    address: str, connects: list[tuple[str, int]], dns: FakeDns
) -> None:
    check_address(address)
    assert (connects, dns.lookups) == ([], [])


@pytest.mark.parametrize(
    ("form", "meaning"),
    [
        ("2130706433", "127.0.0.1"),  # decimal
        ("0x7f000001", "127.0.0.1"),  # one hex number
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("0x7f.1", "127.0.0.1"),  # hex, short form
        ("127.1", "127.0.0.1"),  # short form
        ("0177.1", "127.0.0.1"),
        ("012.0.0.1", "10.0.0.1"),  # octal 012 is 10
        ("0xa9fea9fe", "169.254.169.254"),
        ("[::1]", "::1"),
        ("[::ffff:7f00:1]", "::ffff:7f00:1"),
    ],
)
def test_check_address_reads_odd_literal_forms_as_the_address_they_reach(form: str, meaning: str) -> None:
    with pytest.raises(FetchRefused, match=re.escape(f"{meaning} is ")):
        check_address(form)


def test_check_address_is_given_addresses_not_names() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        check_address("images.example")


# --- the allow list -----------------------------------------------------------------------------------------------


def test_an_allowed_address_passes_and_its_neighbours_do_not() -> None:
    check_address("127.0.0.1", allow=["127.0.0.1"])
    check_address("::ffff:127.0.0.1", allow=["127.0.0.1"])  # the same address, written as IPv6
    with pytest.raises(FetchRefused, match=re.escape("127.0.0.2 is a loopback")):
        check_address("127.0.0.2", allow=["127.0.0.1"])


def test_an_allowed_network_passes_its_addresses_only() -> None:
    check_address("10.1.2.3", allow=["10.0.0.0/8"])
    check_address("fd00::7", allow=["fd00::/8"])
    with pytest.raises(FetchRefused, match=re.escape("192.168.0.1 is a private")):
        check_address("192.168.0.1", allow=["10.0.0.0/8"])


def test_an_allowed_host_name_passes_whatever_it_resolves_to() -> None:
    check_address("10.0.0.5", allow=["images.internal"], host="images.internal")
    check_address("10.0.0.5", allow=["images.internal"], host="IMAGES.internal.")
    with pytest.raises(FetchRefused):
        check_address("10.0.0.5", allow=["images.internal"], host="other.internal")


def test_allow_list_setting_is_parsed_from_a_comma_separated_string() -> None:
    allow = AllowList.parse("127.0.0.1, 10.0.0.0/8 images.internal")
    assert allow.permits(ipaddress.ip_address("10.9.9.9"))
    assert allow.permits(ipaddress.ip_address("192.168.0.1"), host="images.internal")
    assert not allow.permits(ipaddress.ip_address("192.168.0.1"))


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "999.1.1.1", "http://images.internal/", "two words", "a/b"])
def test_an_unreadable_allow_entry_is_an_error_naming_the_setting(entry: str) -> None:
    with pytest.raises(InvalidSetting) as invalid:
        SafeFetcher(allow=[entry])
    assert_one_line(invalid.value, "VLSEARCH_FETCH_ALLOW", repr(entry))


# --- URLs that are refused before anything is resolved or connected -----------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://images.example/a.png", "only http and https"),
        ("gopher://127.0.0.1:70/_", "only http and https"),
        ("data:image/png;base64,iVBORw0KGgo=", "only http and https"),
        ("images.example/a.png", "without a scheme"),
        ("http:///a.png", "no host"),
        ("http://user:secret@images.example/a.png", "passwords"),
        ("http://images.example:99999/a.png", "not a valid URL"),
        ("http://images.example:0/a.png", "port 0"),
        ("http://bad_host!.example/a.png", "not a valid host name"),
    ],
)
def test_urls_that_are_not_plain_http_or_https_are_refused(
    url: str, reason: str, connects: list[tuple[str, int]], dns: FakeDns
) -> None:
    with pytest.raises(FetchRefused) as refused:
        SafeFetcher().fetch(url)
    assert_one_line(refused.value, url, reason)
    assert (connects, dns.lookups) == ([], [])


ODD_FORMS_OF_LOOPBACK = ["2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.1", "0177.1"]


@pytest.mark.parametrize("host", [*ODD_FORMS_OF_LOOPBACK, "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[fe80::1%25lo]"])
def test_odd_forms_of_a_local_address_are_refused_before_any_connection(
    host: str, server: LocalServer, connects: list[tuple[str, int]]
) -> None:
    with pytest.raises(FetchRefused, match="VLSEARCH_FETCH_ALLOW"):
        SafeFetcher().fetch(server.url("/pixel.png", host=host))
    assert connects == []
    assert server.connections == 0


@pytest.mark.parametrize("host", ODD_FORMS_OF_LOOPBACK)
def test_odd_forms_do_reach_the_address_they_spell(host: str, server: LocalServer) -> None:
    """The counterpart of the refusals above: each form really is 127.0.0.1, so it was refused for that reason."""
    assert local().fetch(server.url("/pixel.png", host=host)).data == PNG


def test_a_name_resolving_to_a_local_address_is_refused_before_any_connection(
    server: LocalServer, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    dns.add("localhost", ["127.0.0.1"])
    with pytest.raises(FetchRefused) as refused:
        SafeFetcher().fetch(server.url("/pixel.png", host="localhost"))
    assert_one_line(refused.value, "localhost resolves to 127.0.0.1, which is a loopback address")
    assert (connects, server.connections) == ([], 0)


def test_a_name_with_any_refused_address_is_refused(dns: FakeDns, connects: list[tuple[str, int]]) -> None:
    dns.add("mixed.example", ["93.184.215.14", "10.0.0.1"])
    with pytest.raises(FetchRefused, match=re.escape("mixed.example resolves to 10.0.0.1, which is a private address")):
        SafeFetcher().fetch("http://mixed.example/a.png")
    assert connects == []


# --- fetching from the local server -------------------------------------------------------------------------------


def test_local_server_is_refused_by_default_and_sees_no_request(server: LocalServer) -> None:
    url = server.url("/pixel.png")
    with pytest.raises(FetchRefused) as refused:
        SafeFetcher().fetch(url)
    assert_one_line(refused.value, url, "127.0.0.1 is a loopback address", "VLSEARCH_FETCH_ALLOW")
    assert (server.connections, server.requests) == (0, [])


def test_an_allowed_server_gives_back_its_bytes(server: LocalServer) -> None:
    url = server.url("/pixel.png")
    image = local().fetch(url)
    assert image == FetchedImage(url=url, final_url=url, data=PNG, content_type="image/png")
    assert server.requests == ["/pixel.png"]
    assert "bytes" in repr(image) and "\\x89PNG" not in repr(image)


def test_a_host_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(
    server: LocalServer, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    # A rebinding DNS server: the first answer passes the check, a second lookup would get a private address.
    dns.add("images.example", ["127.0.0.1"], ["10.0.0.1"])
    image = local().fetch(server.url("/pixel.png", host="images.example"))
    assert image.data == PNG
    assert dns.lookups == ["images.example"]
    assert connects == [("127.0.0.1", server.port)]
    assert server.hosts == [f"images.example:{server.port}"]


def test_an_allowed_host_name_may_resolve_to_a_local_address(server: LocalServer, dns: FakeDns) -> None:
    dns.add("images.internal", ["127.0.0.1"])
    assert SafeFetcher(allow=["images.internal"]).fetch(server.url("/pixel.png", host="images.internal")).data == PNG


def test_a_redirect_on_the_allowed_server_is_followed(server: LocalServer) -> None:
    image = local().fetch(server.url("/redirect?to=/pixel.png"))
    assert (image.data, image.final_url) == (PNG, server.url("/pixel.png"))
    assert server.requests == ["/redirect?to=/pixel.png", "/pixel.png"]


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.0.0.1/pixel.png", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://127.0.0.2:{port}/pixel.png", "127.0.0.2 is a loopback address"),
        ("http://[::1]:{port}/pixel.png", "::1 is a loopback address"),
        ("http://0x7f000002:{port}/pixel.png", "127.0.0.2 is a loopback address"),
        ("http://internal.example/pixel.png", "internal.example resolves to 10.0.0.7"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_a_redirect_to_a_refused_address_is_refused_before_connecting_to_it(
    target: str, reason: str, server: LocalServer, dns: FakeDns, connects: list[tuple[str, int]]
) -> None:
    dns.add("internal.example", ["10.0.0.7"])
    target = target.format(port=server.port)
    url = server.url(f"/redirect?to={target}")
    with pytest.raises(FetchRefused) as refused:
        local().fetch(url)
    assert_one_line(refused.value, url, f"redirected to {target}", reason)
    assert connects == [("127.0.0.1", server.port)]  # the first hop only
    assert [path.partition("?")[0] for path in server.requests] == ["/redirect"]


def test_redirects_beyond_the_limit_fail(server: LocalServer) -> None:
    with pytest.raises(FetchFailed, match="more than 2 redirects"):
        local(max_redirects=2).fetch(server.url("/loop"))
    assert server.requests == ["/loop"] * 3


# --- the byte cap -------------------------------------------------------------------------------------------------


def test_a_declared_length_over_the_cap_is_refused_before_the_body(server: LocalServer) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLarge) as too_large:
        local(max_bytes=1000, read_timeout=5.0).fetch(server.url("/held-body"))
    # The server holds the body back: a fetcher that waited for it would take read_timeout and fail otherwise.
    assert time.monotonic() - started < 3.0
    assert too_large.value.category == "too_large"
    assert_one_line(too_large.value, server.url("/held-body"), "Content-Length 10000000", "1000")


@pytest.mark.parametrize("path", ["/stream", "/stream-chunked"])
def test_a_body_without_length_is_stopped_at_the_cap(path: str, server: LocalServer) -> None:
    with pytest.raises(ImageTooLarge, match="more than 100000 bytes"):
        local(max_bytes=100_000).fetch(server.url(path))
    assert server.stream_done.wait(10)
    # Socket buffers let the server get some megabytes ahead; far from everything it would have sent.
    assert server.streamed < STREAM_TOTAL // 2


@pytest.mark.parametrize("path", ["/pixel.png", "/pixel-stream.png"])
def test_a_body_of_exactly_the_cap_is_accepted_and_one_byte_more_is_not(path: str, server: LocalServer) -> None:
    assert local(max_bytes=len(PNG)).fetch(server.url(path)).data == PNG
    with pytest.raises(ImageTooLarge):
        local(max_bytes=len(PNG) - 1).fetch(server.url(path))


# --- timeouts and failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_a_silent_server_trips_the_read_timeout(path: str, server: LocalServer) -> None:
    started = time.monotonic()
    with pytest.raises(FetchFailed) as failed:
        local(read_timeout=0.3).fetch(server.url(path))
    assert time.monotonic() - started < 3.0  # the server stays silent for 10 s
    assert failed.value.category == "unavailable"
    assert_one_line(failed.value, server.url(path), "read_timeout")


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_server_trips_the_total_timeout(path: str, server: LocalServer) -> None:
    started = time.monotonic()
    with pytest.raises(FetchFailed) as failed:
        local(read_timeout=2.0, total_timeout=0.5).fetch(server.url(path))
    assert time.monotonic() - started < 3.0  # the trickle would last 10 s
    assert_one_line(failed.value, "total_timeout")


@pytest.mark.parametrize("status", [404, 500])
def test_an_error_status_is_a_fetch_failure_with_that_status(status: int, server: LocalServer) -> None:
    url = server.url(f"/status/{status}")
    with pytest.raises(FetchFailed) as failed:
        local().fetch(url)
    assert failed.value.status == status
    assert_one_line(failed.value, url, f"HTTP {status}")


def test_a_body_shorter_than_declared_fails(server: LocalServer) -> None:
    with pytest.raises(FetchFailed, match="connection closed after"):
        local().fetch(server.url("/short"))


def test_a_closed_port_fails_to_connect() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchFailed, match="could not connect"):
        local().fetch(f"http://127.0.0.1:{port}/pixel.png")


# --- https: SNI and the certificate are checked against the URL's host name, not the address ----------------------


def test_https_presents_and_checks_the_url_host_name(tls_server: LocalServer, dns: FakeDns) -> None:
    dns.add("images.example", ["127.0.0.1"])
    fetcher = local(ssl_context=ssl.create_default_context(cadata=CERT_PEM))
    image = fetcher.fetch(tls_server.url("/pixel.png", host="images.example", scheme="https"))
    assert image.data == PNG
    assert tls_server.sni == ["images.example"]
    assert tls_server.hosts == [f"images.example:{tls_server.port}"]


@pytest.mark.parametrize("host", ["127.0.0.1", "other.example"])
def test_https_to_a_host_the_certificate_does_not_name_fails(host: str, tls_server: LocalServer, dns: FakeDns) -> None:
    dns.add("other.example", ["127.0.0.1"])
    fetcher = local(ssl_context=ssl.create_default_context(cadata=CERT_PEM))
    with pytest.raises(FetchFailed, match=re.escape(f"TLS certificate not valid for {host}")):
        fetcher.fetch(tls_server.url("/pixel.png", host=host, scheme="https"))
    assert tls_server.requests == []


def test_https_with_the_default_trust_store_refuses_a_self_signed_certificate(
    tls_server: LocalServer, dns: FakeDns
) -> None:
    dns.add("images.example", ["127.0.0.1"])
    with pytest.raises(FetchFailed, match="TLS certificate not valid"):
        local().fetch(tls_server.url("/pixel.png", host="images.example", scheme="https"))
