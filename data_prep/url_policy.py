"""Which URLs the download stage may fetch: a pure policy, decided without any network access.

A URL list from the web (LAION) is untrusted input. Fetched naively from a cluster node, a row
like ``file:///etc/passwd``, ``http://169.254.169.254/latest/meta-data/`` or
``http://10.0.0.5:8265/`` (the Ray dashboard) turns the download stage into a reader of local
files, cloud credentials and internal services, and whatever it reads could land in a shard.

The policy has two checks, both pure functions (no DNS, no sockets), so they can run before
anything is opened and be unit-tested on their own:

* :func:`check_url` on the URL string: the scheme must be in ``schemes`` (default http, https;
  ``file:``, ``data:``, ``ftp:`` … are refused), the host must be present and not a
  cloud-metadata name, and a host that is an IP literal (any form the resolver would accept,
  e.g. ``2130706433`` or ``0x7f.1``, which both mean 127.0.0.1) is checked as an address right
  away. It also returns the request target percent-encoded as browsers do (UTF-8 for non-ASCII
  path and query, IDNA for the host), so ``/images/café.jpg`` is fetched as
  ``/images/caf%C3%A9.jpg``.
* :func:`check_address` on every address a host name resolves to: refused when unspecified,
  loopback, link-local, multicast, private, site-local, reserved, shared (100.64/10) or not
  globally routable, and cloud-metadata addresses are always refused. IPv4 addresses embedded
  in IPv6 (``::ffff:10.0.0.1``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by the
  IPv4 address they reach.

``allow_networks`` (CIDRs, default none) re-allows addresses inside them: the demo and the tests
serve on 127.0.0.1 and set ``["127.0.0.1/32"]``; a cluster with an internal image mirror would
list the mirror's network. Metadata addresses and names stay refused even inside an allowed
network: no image lives there.

The fetcher (:mod:`data_prep.fetch`) applies this policy at every redirect hop and connects to
the very address it checked, so a DNS answer cannot change between check and connect.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Schemes the fetcher implements; a policy may narrow them, never widen them.
FETCHABLE_SCHEMES = ("http", "https")
# Cloud instance-metadata endpoints (AWS IMDS v4/v6 and ECS, GCP, Azure, Oracle, Alibaba).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
    "metadata.azure.internal", "metadata.platformequinix.com"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not private, not global either
# Characters left as they are when encoding a path or query (RFC 3986 reserved + '%' so that
# existing escapes survive); everything else, non-ASCII and spaces included, is %-encoded as UTF-8.
_SAFE_PATH = "/%!$&'()*+,;=:@~"
_SAFE_QUERY = _SAFE_PATH + "?"


class Refused(ValueError):
    """A URL or address the policy does not allow; the message says why."""


@dataclass(frozen=True)
class UrlPolicy:
    schemes: tuple[str, ...] = FETCHABLE_SCHEMES
    allow_networks: tuple[str, ...] = ()

    def validate(self) -> None:
        for s in self.schemes:
            if s.lower() not in FETCHABLE_SCHEMES:
                raise ValueError(f"allowed_schemes: {s!r} cannot be fetched (only {', '.join(FETCHABLE_SCHEMES)})")
        for n in self.allow_networks:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as e:
                raise ValueError(f"allow_networks: {n!r} is not an IP network ({e})") from None

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.allow_networks)


@dataclass(frozen=True)
class Target:
    """A URL that passed :func:`check_url`, split into what a connection needs."""

    scheme: str
    host: str  # ASCII (IDNA) host name or IP address, no brackets
    port: int
    path: str  # request target: percent-encoded path + query
    address: IPAddress | None  # the host is an IP literal: the address to connect to, already checked

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return f"{self.scheme}://{host}{'' if self.port == default else f':{self.port}'}{self.path}"


def check_url(url: str, policy: UrlPolicy) -> Target:
    """Parse and check ``url`` without touching the network; raises :class:`Refused`.

    A host name (not an IP literal) still needs :func:`check_address` on each of its resolved
    addresses before a connection is opened.
    """
    url = (url or "").strip()
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise Refused(f"invalid URL {url[:200]!r} ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in {s.lower() for s in policy.schemes}:
        shown = f"{scheme!r}" if scheme else "none"
        raise Refused(f"scheme {shown} not allowed (allowed: {', '.join(policy.schemes)})")
    host = parts.hostname or ""
    if not host:
        raise Refused(f"no host in {url[:200]!r}")
    address = _ip_literal(host)
    if address is None:
        host = _ascii_host(host)
        if host.rstrip(".") in METADATA_HOSTS:
            raise Refused(f"host {host!r} is a cloud metadata service")
    else:
        check_address(address, policy)
        host = str(address)
    path = urllib.parse.quote(parts.path or "/", safe=_SAFE_PATH)
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe=_SAFE_QUERY)
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path, address)


def check_address(address: str | IPAddress, policy: UrlPolicy) -> None:
    """Refuse (raise :class:`Refused`) an address that is not a public unicast one, unless it is
    inside ``policy.allow_networks``; metadata addresses are refused even there."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise Refused(f"{address!r} is not an IP address") from None
    reached = embedded_ipv4(ip) or ip  # where a connection to `ip` actually ends up
    if ip in METADATA_ADDRESSES or reached in METADATA_ADDRESSES:
        raise Refused(f"{ip} is a cloud metadata address")
    if any(reached.version == n.version and reached in n for n in policy.networks()):
        return
    kind = address_kind(reached)
    if kind:
        via = f" (reaches {reached})" if reached != ip else ""
        raise Refused(f"{ip} is a {kind} address{via}")


def address_kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` not a public unicast address (None when it is one)."""
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
              ("multicast", ip.is_multicast), ("private", ip.is_private),
              ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
              ("reserved", ip.is_reserved), ("shared (carrier-grade NAT)", ip in _SHARED if ip.version == 4 else False))
    for name, hit in checks:
        if hit:
            return name
    return None if ip.is_global else "non-global"


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to: IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _ip_literal(host: str) -> IPAddress | None:
    """``host`` as an address if the resolver would read it as one (also 2130706433, 0x7f.1, 017.1)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if "%" in host:  # an IPv6 zone id ("fe80::1%eth0"): never a public address
        raise Refused(f"host {host!r} has an IPv6 zone id")
    if host.replace(".", "").replace("x", "").replace("X", "").isalnum() and host[:1].isdigit():
        try:  # the legacy numeric forms glibc's resolver accepts, parsed offline
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _ascii_host(host: str) -> str:
    """IDNA-encode a non-ASCII host name (as browsers do); refuse characters no host name has."""
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise Refused(f"host {host!r} is not a valid internationalized domain name") from None
    if not all(c.isalnum() or c in "-._" for c in ascii_host):
        raise Refused(f"host {host!r} has characters a host name cannot have")
    return ascii_host.lower()
