"""A safe fetcher for image URLs: only public addresses, each checked before it is connected to.

Server-side request forgery is the threat: a URL in a listing must not reach the metadata service, a database on
the private network or a port on this machine. So the host is resolved once, every address it resolves to is
checked, and the connection is made to a checked address (never to the name again, which a second DNS answer could
point elsewhere); redirects are followed by hand and each hop is checked the same way. `VLSEARCH_FETCH_ALLOW`
names the exceptions (addresses, networks or host names).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urljoin, urlsplit

from indexer.errors import ErrorCategory, ImageTooLarge, InvalidSetting, VlsearchError

ALLOW_SETTING = "VLSEARCH_FETCH_ALLOW"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # the decoder's own default byte limit
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "vlsearch-fetch/0.1"
_CHUNK = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchRefused(VlsearchError):
    """A URL that is not fetched by policy: a scheme other than http(s), or a host on a non-public address."""

    category: ClassVar[ErrorCategory] = "invalid_input"

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: refused: {reason}")


class FetchFailed(VlsearchError):
    """A URL that was allowed but could not be fetched: unreachable, too slow, a TLS or HTTP error status."""

    category: ClassVar[ErrorCategory] = "unavailable"

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        self.url = url
        self.reason = reason
        self.status = status
        super().__init__(f"{url}: {reason}")


# Named so that a refusal says what the address is; anything else Python does not call global is refused too.
_V4_NAMED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), name)
    for net, name in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("169.254.0.0/16", "a link-local address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("192.0.0.0/24", "an IETF protocol assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)
_V6_NAMED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), name)
    for net, name in (
        ("::/128", "the unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "a deprecated IPv4-compatible address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a unique local (private) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_INET_ATON_FORM = re.compile(r"[0-9a-fx.]+", re.IGNORECASE)


@dataclass(frozen=True)
class AllowList:
    """Exceptions to the address check: networks (a single address is a /32 or /128) and exact host names."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Sequence[str] | str) -> AllowList:
        """From addresses, CIDR networks and host names (a string is split on commas and spaces)."""
        if isinstance(entries, str):
            entries = entries.replace(",", " ").split()
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in entries:
            entry = raw.strip().lower()
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if _HOST_NAME.fullmatch(entry) and not re.fullmatch(r"[0-9.]+", entry):
                hosts.add(entry.rstrip("."))
            else:
                raise InvalidSetting(
                    f"{ALLOW_SETTING}: {raw!r} is neither an IP address, a CIDR network nor a host name"
                )
        return cls(tuple(networks), frozenset(hosts))

    def permits(self, ip: IPAddress, host: str | None = None) -> bool:
        """True if ip (or its IPv4 form, for an IPv4-mapped address) or the host name is listed."""
        if host is not None and host.lower().rstrip(".") in self.hosts:
            return True
        candidates: list[IPAddress] = [_without_scope(ip)]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks if c.version == net.version)


def parse_ip_literal(text: str) -> IPAddress | None:
    """The address a host written as an IP literal means, in any form the C resolver accepts (decimal
    `2130706433`, octal `0177.0.0.1`, hex `0x7f.1`, short `127.1`, `[::1]`, zone ids); None for a host name."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _INET_ATON_FORM.fullmatch(text):
        # The same parser getaddrinfo uses for numeric IPv4 hosts, so the check sees what a connect would reach.
        with contextlib.suppress(OSError):
            return ipaddress.IPv4Address(socket.inet_aton(text))
    return None


def address_problem(ip: IPAddress, allow: AllowList = AllowList(), host: str | None = None) -> str | None:
    """Why connecting to ip could reach a non-public network ('a loopback address', ...), or None if it may."""
    if allow.permits(ip, host):
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_problem(ip)
    ip = _without_scope(ip)
    assert isinstance(ip, ipaddress.IPv6Address)
    # IPv6 forms that carry an IPv4 address reach that address (through the kernel, a 6to4 relay, a NAT64
    # gateway or a Teredo tunnel), so the embedded address is checked as itself.
    if ip.ipv4_mapped is not None:
        return _embedded(ip.ipv4_mapped, "IPv4-mapped")
    if ip in _NAT64:
        return _embedded(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64")
    if ip.sixtofour is not None and (problem := _v4_problem(ip.sixtofour)):
        return f"the 6to4 form of {ip.sixtofour}, {problem}"
    if ip.teredo is not None:
        for embedded in ip.teredo:
            if problem := _v4_problem(embedded):
                return f"a Teredo address carrying {embedded}, {problem}"
    for net, name in _V6_NAMED:
        if ip in net:
            return name
    if not ip.is_global or ip.is_reserved:
        return "not a global address"
    return None


def check_address(ip: str | IPAddress, allow: Sequence[str] | AllowList = (), host: str | None = None) -> None:
    """Raise FetchRefused unless ip is a public address, or allow lists it (or the host name it came from).
    A pure check: nothing is resolved or connected; a string may be any IP literal form (`0x7f.1`, `[::1]`)."""
    address = parse_ip_literal(ip) if isinstance(ip, str) else ip
    if address is None:
        raise ValueError(f"not an IP address: {ip!r}")
    allow_list = allow if isinstance(allow, AllowList) else AllowList.parse(allow)
    problem = address_problem(address, allow_list, host)
    if problem is not None:
        raise FetchRefused(str(ip), f"{address} is {problem} (to allow it, add it to {ALLOW_SETTING})")


@dataclass(frozen=True)
class FetchedImage:
    """The bytes at a URL; final_url is where the redirects (if any) ended."""

    url: str
    final_url: str
    data: bytes = field(repr=False)
    content_type: str | None

    def __repr__(self) -> str:  # not the bytes
        return f"FetchedImage(url={self.url!r}, final_url={self.final_url!r}, {len(self.data)} bytes, " \
               f"content_type={self.content_type!r})"


class SafeFetcher:
    """Fetches http(s) URLs from public addresses only, with a byte cap, timeouts and checked redirects.

    A host name that resolves to several addresses is refused if any of them is refused (a name that mixes
    public and internal addresses is not one to trust), unless the name itself is on the allow list.
    """

    def __init__(
        self,
        allow: Sequence[str] | AllowList = (),
        max_bytes: int = DEFAULT_MAX_BYTES,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        total_timeout: float = 60.0,
        max_redirects: int = 3,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_bytes <= 0 or connect_timeout <= 0 or read_timeout <= 0 or total_timeout <= 0 or max_redirects < 0:
            raise ValueError(
                f"fetch limits must be positive: max_bytes={max_bytes}, connect_timeout={connect_timeout}, "
                f"read_timeout={read_timeout}, total_timeout={total_timeout}, max_redirects={max_redirects}"
            )
        self.allow = allow if isinstance(allow, AllowList) else AllowList.parse(allow)
        self.max_bytes = max_bytes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout  # bounds a server that trickles bytes just under read_timeout
        self.max_redirects = max_redirects
        self._ssl_context = ssl_context

    def fetch(self, url: str) -> FetchedImage:
        """The bytes at url; FetchRefused before any connection if it (or a redirect) is not allowed,
        FetchFailed if it cannot be fetched, ImageTooLarge over max_bytes."""
        deadline = time.monotonic() + self.total_timeout
        current = url
        for _ in range(self.max_redirects + 1):
            target = self._target(url, current)
            addresses = self._resolve(url, current, target)
            response = self._exchange(url, current, target, addresses, deadline)
            if isinstance(response, _Redirect):
                current = urljoin(current, response.location)
                continue
            return FetchedImage(url=url, final_url=current, data=response.data, content_type=response.content_type)
        raise FetchFailed(url, f"more than {self.max_redirects} redirects (max_redirects), the last to {current}")

    def _target(self, url: str, current: str) -> _Target:
        def refuse(reason: str) -> FetchRefused:
            return FetchRefused(url, reason if current == url else f"redirected to {current}: {reason}")

        try:
            parts = urlsplit(current.strip())
            port = parts.port
        except ValueError as error:
            raise refuse(f"not a valid URL ({error})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            given = f"{scheme}:" if scheme else "one without a scheme"
            raise refuse(f"only http and https URLs are fetched, not {given}")
        if parts.username is not None or parts.password is not None:
            raise refuse("user names and passwords in URLs are not supported")
        host = parts.hostname or ""
        if "[" in parts.netloc:  # an IPv6 literal; a zone id comes percent-encoded ("%25eth0")
            host = unquote(host)
            if parse_ip_literal(host) is None:
                raise refuse(f"{host!r} is not a valid IPv6 address")
        elif parse_ip_literal(host) is None:
            try:
                host = host.encode("idna").decode("ascii").lower()
            except UnicodeError:
                raise refuse(f"{host!r} is not a valid host name") from None
            if not _HOST_NAME.fullmatch(host):
                raise refuse(f"{host!r} is not a valid host name" if host else "the URL has no host")
        if port == 0:
            raise refuse("port 0 cannot be connected to")
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)

    def _resolve(self, url: str, current: str, target: _Target) -> list[_Address]:
        """Every address the host resolves to (resolved once), each checked; raises before any connection."""
        hop = "" if current == url else f"redirected to {current}: "
        literal = parse_ip_literal(target.host)
        if literal is not None:
            # Checked before the numeric getaddrinfo below, which only turns it into a socket address.
            self._check(url, hop, target.host, literal)
        try:
            infos = socket.getaddrinfo(
                str(literal) if literal is not None else target.host,
                target.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_NUMERICHOST if literal is not None else 0,
            )
        except (socket.gaierror, UnicodeError) as error:
            raise FetchFailed(url, f"{hop}host {target.host!r} could not be resolved ({error})") from None
        addresses: list[_Address] = []
        for family, _type, proto, _name, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            self._check(url, hop, target.host, ip)
            address = _Address(family, proto, sockaddr, ip)
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise FetchFailed(url, f"{hop}host {target.host!r} resolved to no address")
        return addresses

    def _check(self, url: str, hop: str, host: str, ip: IPAddress) -> None:
        problem = address_problem(ip, self.allow, host)
        if problem is not None:
            what = f"{ip} is" if parse_ip_literal(host) == ip else f"{host} resolves to {ip}, which is"
            raise FetchRefused(url, f"{hop}{what} {problem} (to allow it, add it to {ALLOW_SETTING})")

    def _exchange(
        self, url: str, current: str, target: _Target, addresses: list[_Address], deadline: float
    ) -> _Body | _Redirect:
        hop = "" if current == url else f"redirected to {current}: "
        sock, watchdog = self._open(url, hop, target, addresses, deadline)
        connection = http.client.HTTPConnection(target.host, target.port)
        if target.scheme == "https":
            connection.default_port = 443  # so the Host header omits the port exactly when it is the default
        connection.sock = sock  # already connected to the checked address: http.client must not connect again
        try:
            connection.request("GET", target.path, headers={
                "User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity", "Connection": "close",
            })
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise FetchFailed(url, f"{hop}HTTP {response.status} redirect without a Location", response.status)
                return _Redirect(location)
            if not 200 <= response.status < 300:
                raise FetchFailed(url, f"{hop}HTTP {response.status} {response.reason}".rstrip(), response.status)
            data = self._read_body(url, response)
            if watchdog.fired:  # its shutdown reads as the end of a body without a Content-Length
                raise TimeoutError
            return _Body(data, response.getheader("Content-Type"))
        except (OSError, http.client.HTTPException) as error:
            if watchdog.fired:
                raise FetchFailed(url, f"{hop}not done within {self.total_timeout} s (total_timeout)") from None
            if isinstance(error, TimeoutError):
                raise FetchFailed(url, f"{hop}no data for {self.read_timeout} s (read_timeout)") from None
            raise FetchFailed(url, f"{hop}{_describe(error)}") from None
        finally:
            watchdog.cancel()
            connection.close()

    def _open(
        self, url: str, hop: str, target: _Target, addresses: list[_Address], deadline: float
    ) -> tuple[socket.socket, _Watchdog]:
        failures: list[str] = []
        for address in addresses:
            timeout = min(self.connect_timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise FetchFailed(url, f"{hop}not done within {self.total_timeout} s (total_timeout)")
            try:
                sock = _connect(address.family, address.proto, address.sockaddr, timeout)
            except TimeoutError:
                failures.append(f"{address.ip}: no answer within {timeout:g} s (connect_timeout)")
            except OSError as error:
                failures.append(f"{address.ip}: {_describe(error)}")
            else:
                break
        else:
            raise FetchFailed(url, f"{hop}could not connect ({'; '.join(failures)})")
        sock.settimeout(self.read_timeout)
        watchdog = _Watchdog(sock, deadline - time.monotonic())
        if target.scheme != "https":
            return sock, watchdog
        context = self._ssl_context or ssl.create_default_context()
        try:
            tls = context.wrap_socket(sock, server_hostname=target.host)  # SNI and certificate: the URL's host
        except ssl.SSLCertVerificationError as error:
            watchdog.cancel()
            sock.close()
            reason = f"TLS certificate not valid for {target.host}: {error.verify_message}"
            raise FetchFailed(url, f"{hop}{reason}") from None
        except OSError as error:
            watchdog.cancel()
            sock.close()
            reason = "TLS handshake timed out (read_timeout)" if isinstance(error, TimeoutError) else (
                f"TLS handshake failed: {_describe(error)}")
            raise FetchFailed(url, f"{hop}{reason}") from None
        watchdog.sock = tls
        return tls, watchdog

    def _read_body(self, url: str, response: http.client.HTTPResponse) -> bytes:
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLarge(url, f"Content-Length {int(declared)} bytes is over the limit of "
                                     f"{self.max_bytes} (max_bytes)")
        chunks: list[bytes] = []
        size = 0
        while True:
            # Reading one byte past the cap tells "exactly max_bytes" from "more", without downloading the rest.
            chunk = response.read1(min(_CHUNK, self.max_bytes + 1 - size))
            if not chunk:
                if response.length:  # http.client's read1 ends a short Content-Length body without an error
                    raise http.client.IncompleteRead(b"".join(chunks), response.length)
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_bytes:
                raise ImageTooLarge(url, f"more than {self.max_bytes} bytes (max_bytes); download stopped")
            chunks.append(chunk)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # lower-case, IDNA-encoded, without brackets: for the Host header, SNI and the allow list
    port: int
    path: str  # the request target: path and query, no fragment


@dataclass(frozen=True)
class _Address:
    family: int
    proto: int
    sockaddr: tuple[Any, ...]  # (ip, port) or (ip, port, flowinfo, scope_id)
    ip: IPAddress


@dataclass(frozen=True)
class _Redirect:
    location: str


@dataclass(frozen=True)
class _Body:
    data: bytes
    content_type: str | None


class _Watchdog:
    """Shuts the socket down when the fetch's deadline passes, whatever read it is blocked in."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown drops its TLS state, which
        # the thread blocked in a read still uses.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _connect(family: int, proto: int, sockaddr: tuple[Any, ...], timeout: float) -> socket.socket:
    """A TCP connection to exactly this socket address (an address already checked; no name is resolved)."""
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _v4_problem(ip: ipaddress.IPv4Address) -> str | None:
    for net, name in _V4_NAMED:
        if ip in net:
            return name
    if not ip.is_global or ip.is_reserved or ip.is_multicast:
        return "not a global address"
    return None


def _embedded(embedded: ipaddress.IPv4Address, form: str) -> str | None:
    problem = _v4_problem(embedded)
    return None if problem is None else f"the {form} form of {embedded}, {problem}"


def _without_scope(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _describe(error: BaseException) -> str:
    if isinstance(error, http.client.IncompleteRead):
        return f"connection closed after {len(error.partial)} bytes, {error.expected} more were expected"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without a response"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
