"""The one HTTP transport under every provider SDK: a ``urllib3.PoolManager`` per sender, shared by every
sending thread.

Each SDK still builds its request (Twilio's ``MessageList.create``, SendGrid's ``Mail`` helpers, google-auth's
bearer token); only the last step, putting the bytes on a connection, is ours. ``requests`` cost about a
millisecond of CPU per send on top of urllib3 (``Session.prepare_request``, environment merging, hooks,
adapters), a fifth of a delivery's CPU; urllib3 is what it sends with underneath anyway.

Every pool is built the same way: ``pool_size`` keep-alive connections per host, non-blocking (a thread
beyond them opens a connection of its own and closes it after that request, with urllib3's "Connection pool
is full" warning, rather than wait with no time limit), no retries and no redirects: a POST that may have
reached the provider is never sent again behind the caller's back; retrying is the queue's job.
"""

from __future__ import annotations

import os
from typing import Any

import urllib3
from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy


def environ_proxy(url: str) -> str | None:
    """The proxy ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` name for ``url`` now, None when there is
    none or ``NO_PROXY`` exempts the host (requests' own reading of them)."""
    return select_proxy(url, get_environ_proxies(url))


def environ_ca_bundle() -> str | None:
    """The CA bundle ``REQUESTS_CA_BUNDLE`` (or ``CURL_CA_BUNDLE``) names, if any."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def connection_pool(base_url: str, pool_size: int) -> urllib3.PoolManager:
    """A pool for every sending thread of one sender (see the module's docstring). Proxy (``HTTPS_PROXY`` /
    ``HTTP_PROXY`` / ``NO_PROXY``) and CA bundle (``REQUESTS_CA_BUNDLE``) are read from the environment now,
    once: reading them again on every request cost a tenth of a millisecond per send; a change needs a
    restart."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size!r}")
    options: dict[str, Any] = dict(maxsize=pool_size, block=False, retries=False)
    bundle = environ_ca_bundle()
    if bundle:
        options["ca_certs"] = bundle
    proxy = environ_proxy(base_url)
    if proxy is None:
        return urllib3.PoolManager(**options)
    username, password = get_auth_from_url(proxy)
    headers = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **options)


def timeout(seconds: float) -> urllib3.Timeout:
    """Connect and each read bounded by ``seconds``."""
    return urllib3.Timeout(connect=seconds, read=seconds)


def socket_error(exc: BaseException) -> BaseException:
    """The error under urllib3's wrappers (NewConnectionError -> ConnectionRefusedError, ProtocolError ->
    RemoteDisconnected, ProxyError -> ...): what a log line or an error message should name."""
    for _ in range(8):
        if not isinstance(exc, urllib3.exceptions.HTTPError):
            return exc
        inner = next((a for a in reversed(exc.args) if isinstance(a, BaseException)), None) or exc.__cause__
        if inner is None:
            return exc
        exc = inner
    return exc


def unanswered(exc: urllib3.exceptions.HTTPError, provider: str, seconds: float) -> str:
    """Why a provider call got no answer, in the words the senders' errors use."""
    if isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(exc, urllib3.exceptions.NewConnectionError):
        return f"{provider} did not answer within {seconds:g} s"
    return f"{provider} not reached: {type(socket_error(exc)).__name__}"
