"""Proxy URLs in the configuration: parsed and checked at load time, redacted for
messages. The proxy itself is spoken to by `gateway.net.http_proxy`."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

__all__ = ["parse_proxy_url", "redact_proxy_url"]


def parse_proxy_url(url: str) -> tuple[str, int, str | None, str | None]:
    """``http://[user:pass@]host[:port]`` -> (host, port, user, password).

    A URL without a scheme is taken as http (as curl does); the port defaults
    to 80. Proxies spoken to over TLS (``https://``) are not supported.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(
            f"unsupported proxy scheme {parts.scheme!r} in {redact_proxy_url(url)!r}: "
            "only http:// proxies (CONNECT over plain HTTP)"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"invalid port in proxy URL {redact_proxy_url(url)!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in proxy URL {redact_proxy_url(url)!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"a proxy URL has no path: {redact_proxy_url(url)!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return host, port, user, password


def redact_proxy_url(url: str) -> str:
    """The URL without its password, fit for a message."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return url.replace(parts.netloc, f"{user}:***@{netloc}")
