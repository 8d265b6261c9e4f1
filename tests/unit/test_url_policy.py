"""The URL policy alone: pure functions, no DNS and no sockets (both are made to fail here)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from data_prep import download
from data_prep.url_policy import Refused, UrlPolicy, address_kind, check_address, check_url, embedded_ipv4
from pipeline.config import ConfigError, build

DEFAULT = UrlPolicy()
LOOPBACK_ALLOWED = UrlPolicy(allow_networks=("127.0.0.1/32",))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The policy must decide without resolving or connecting."""
    def refuse(*a, **k):
        raise AssertionError(f"the policy touched the network: {a}")
    for name in ("getaddrinfo", "gethostbyname", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("address,kind", [
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "cloud metadata"), ("169.254.170.2", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("fd00::1", "private"), ("fc00::5", "private"), ("fec0::1", "site-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"), ("ff0e::1", "multicast"),
    ("240.0.0.1", "private"), ("255.255.255.255", "private"), ("100.64.0.1", "shared"),
    ("192.0.2.1", "private"), ("198.18.0.1", "private"), ("2001:db8::1", "private"),
    # IPv4 inside IPv6: judged by the IPv4 address the connection reaches
    ("::ffff:10.0.0.1", "private"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "cloud metadata"),
    ("64:ff9b::a00:1", "private"), ("2002:a00:1::", "private"), ("::127.0.0.1", "reserved"),
])
def test_non_public_addresses_are_refused(address, kind):
    with pytest.raises(Refused, match=kind):
        check_address(address, DEFAULT)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::"])
def test_public_addresses_pass(address):
    check_address(address, DEFAULT)
    ip = ipaddress.ip_address(address)
    assert address_kind(embedded_ipv4(ip) or ip) is None


def test_allow_networks_reopen_exactly_what_they_list():
    check_address("127.0.0.1", LOOPBACK_ALLOWED)
    check_address("::ffff:127.0.0.1", LOOPBACK_ALLOWED)  # reaches 127.0.0.1
    for refused in ("127.0.0.2", "::1", "10.0.0.1"):
        with pytest.raises(Refused):
            check_address(refused, LOOPBACK_ALLOWED)
    check_address("::1", UrlPolicy(allow_networks=("::1/128",)))
    inside = UrlPolicy(allow_networks=("169.254.0.0/16", "fd00::/8"))
    check_address("169.254.1.1", inside)
    for metadata in ("169.254.169.254", "fd00:ec2::254"):  # never, even inside an allowed network
        with pytest.raises(Refused, match="metadata"):
            check_address(metadata, inside)


@pytest.mark.parametrize("url,message", [
    ("file:///etc/passwd", "scheme 'file' not allowed"),
    ("FILE:///etc/passwd", "scheme 'file' not allowed"),
    ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data' not allowed"),
    ("ftp://example.com/a.jpg", "scheme 'ftp' not allowed"),
    ("gopher://example.com/", "scheme 'gopher' not allowed"),
    ("javascript:alert(1)", "scheme 'javascript' not allowed"),
    ("//example.com/a.jpg", "scheme none not allowed"),
    ("not-a-url", "scheme none not allowed"),
    ("http:///a.jpg", "no host"),
    ("http://example.com:99999/a.jpg", "invalid URL"),
    ("http://10.0.0.1/a.jpg", "private"),
    ("http://192.168.1.1:8080/a.jpg", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://[::1]/a.jpg", "loopback"),
    ("http://[fd00::1]/a.jpg", "private"),
    ("http://[::ffff:10.0.0.1]/a.jpg", "private"),
    ("http://[fe80::1%25eth0]/a.jpg", "link-local"),
    ("http://2130706433/a.jpg", "loopback"),  # 127.0.0.1 as one number
    ("http://0x7f.1/a.jpg", "loopback"),
    ("http://0177.0.0.1/a.jpg", "loopback"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://METADATA.google.internal./computeMetadata/v1/", "metadata"),
    ("http://user:pw@10.0.0.1/a.jpg", "private"),
    ("http://example.com@10.0.0.1/a.jpg", "private"),
    ("http://exa mple.com/a.jpg", "characters a host name cannot have"),
])
def test_urls_refused_from_the_string_alone(url, message):
    with pytest.raises(Refused, match=message):
        check_url(url, DEFAULT)


def test_allowed_urls_are_encoded_like_a_browser_would():
    t = check_url("  https://Example.COM/images/café 1.jpg?q=crème brûlée&x=%41#frag ", DEFAULT)
    assert (t.scheme, t.host, t.port, t.address) == ("https", "example.com", 443, None)
    assert t.path == "/images/caf%C3%A9%201.jpg?q=cr%C3%A8me%20br%C3%BBl%C3%A9e&x=%41"
    assert t.url == "https://example.com/images/caf%C3%A9%201.jpg?q=cr%C3%A8me%20br%C3%BBl%C3%A9e&x=%41"
    idn = check_url("http://bücher.example:8080", DEFAULT)
    assert (idn.host, idn.port, idn.path) == ("xn--bcher-kva.example", 8080, "/")
    # no header injection: CR/LF/tab are dropped (as browsers do), other controls are %-encoded
    assert check_url("http://127.0.0.1:9/a\r\nX-Injected: 1\x00", LOOPBACK_ALLOWED).path == "/aX-Injected:%201%00"
    literal = check_url("http://[2606:4700::1111]/x.png", DEFAULT)
    assert str(literal.address) == "2606:4700::1111" and literal.url == "http://[2606:4700::1111]/x.png"


def test_schemes_can_be_narrowed_not_widened():
    with pytest.raises(Refused, match="scheme 'http' not allowed"):
        check_url("http://example.com/a.jpg", UrlPolicy(schemes=("https",)))
    with pytest.raises(ConfigError, match=r"stages.download.allowed_schemes: 'file' cannot be fetched"):
        build(download.DownloadConfig, {"allowed_schemes": ["http", "file"]}, "stages.download")
    with pytest.raises(ConfigError, match=r"stages.download.allow_networks: 'localhost' is not an IP network"):
        build(download.DownloadConfig, {"allow_networks": ["localhost"]}, "stages.download")
    cfg = build(download.DownloadConfig, {"allow_networks": ["127.0.0.1/32"]}, "stages.download")
    assert cfg.policy() == LOOPBACK_ALLOWED and cfg.allow_networks == ("127.0.0.1/32",)


@pytest.mark.parametrize("error,reason", [
    ("bad_url: scheme 'file' not allowed (allowed: http, https) [file:///etc/passwd]", "bad_url"),
    ("too_large: 30000x30000 exceeds 89478485 pixels", "too_large"),
    ("too_large: response exceeds max_bytes 1000", "too_large"),
    ("network_error: ConnectionRefusedError: [Errno 111] Connection refused", "network_error"),
    ("http_error: HTTP Error 404: Not Found", "http_error"),
    ("decode_error: UnidentifiedImageError: cannot identify image file", "decode_error"),
    ("OpenCV(4.14.0) loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS "
     "in function 'validateInputImageSize'", "too_large"),
])
def test_guarded_fetch_errors_map_to_reasons(error, reason):
    assert download.failure_reason("failed_to_download", error) == reason
