"""Broker URLs: parsing, failover lists and password masking.

A broker URL is ``scheme://user:password@host:port/path?option=value``. The
transport is named by the scheme, or by the part before ``+`` when the scheme
wraps another URL (``sqla+postgresql://...`` is the ``sqla`` transport speaking
to ``postgresql://...``). Several URLs separated by ``;`` (or given as a list)
are failover alternatives, tried in turn.

Passwords never appear in ``repr()`` or ``str()`` of a ``BrokerURL``; use
``BrokerURL.safe_url()`` (or ``safe_url(url)`` on a plain string) in logs and errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import ImproperlyConfigured

__all__ = ["BrokerURL", "parse_url", "safe_url", "split_failover"]

_MASK = "**"
# Query options whose values are secrets too.
_SECRET_OPTIONS = frozenset({"password", "passwd", "sentinel_password"})


@dataclass(frozen=True, repr=False)
class BrokerURL:
    """A parsed broker URL.

    Attributes:
        url: the URL as given (holds the password: do not log it).
        scheme: the whole scheme, lower case (``"sqla+postgresql"``).
        transport: the transport's name: the scheme up to the first ``+``.
        host / port / user / password: from the authority part (decoded).
        path: the raw path (``"/0"``, ``"//"``, ``"/tmp/x.sqlite3"``).
        virtual_host: the path without its leading ``/``, decoded: the AMQP
            virtual host, the Redis database number or the database name.
        query: the query options, last value wins.
    """

    url: str
    scheme: str
    transport: str
    host: str | None
    port: int | None
    user: str | None
    password: str | None
    path: str
    virtual_host: str
    query: dict[str, str]

    @property
    def inner_url(self) -> str:
        """For a wrapping scheme (``sqla+postgresql://...``) the wrapped URL, else the URL."""
        prefix, sep, _rest = self.url.partition("+")
        if sep and "://" not in prefix and prefix.lower() == self.transport:
            return self.url[len(prefix) + 1 :]
        return self.url

    def safe_url(self) -> str:
        """The URL with its password (and secret query options) replaced by ``**``."""
        return _mask(self.url)

    def __str__(self) -> str:
        return self.safe_url()

    def __repr__(self) -> str:
        return f"<BrokerURL {self.safe_url()}>"


def parse_url(url: str) -> BrokerURL:
    """Parse one broker URL.

    Raises:
        ImproperlyConfigured: the URL has no scheme or an invalid port.
    """
    if "://" not in url:
        raise ImproperlyConfigured(f"broker URL {safe_url(url)!r} has no scheme://")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"bad port in broker URL {safe_url(url)!r}") from exc
    scheme = parts.scheme.lower()
    path = parts.path
    return BrokerURL(
        url=url,
        scheme=scheme,
        transport=scheme.split("+", 1)[0],
        host=unquote(parts.hostname) if parts.hostname else None,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        path=path,
        virtual_host=unquote(path[1:]) if path.startswith("/") else unquote(path),
        query=dict(parse_qsl(parts.query)),
    )


def split_failover(urls: str | Sequence[str]) -> list[str]:
    """Split ``"url1;url2"`` (or a list of such strings) into single URLs, in order.

    Raises:
        ImproperlyConfigured: no URL at all.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    result = [part.strip() for item in items for part in item.split(";") if part.strip()]
    if not result:
        raise ImproperlyConfigured("no broker URL given")
    return result


def safe_url(url: str) -> str:
    """``url`` with the password and secret query options replaced by ``**``."""
    return _mask(url)


def _mask(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # Cut by hand rather than urlunsplit(), which rewrites "sqlite:///x" as "sqlite:/x".
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{_MASK}@{hostinfo}"
    before, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key in _SECRET_OPTIONS for key, _ in pairs):
            query = "&".join(
                f"{quote(key)}={_MASK if key in _SECRET_OPTIONS else quote(value)}"
                for key, value in pairs
            )
        tail = f"{before}?{query}{hash_}{fragment}"
    return f"{scheme}://{netloc}{tail}"
