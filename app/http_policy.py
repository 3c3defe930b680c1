"""What this server sends with every answer and which Host names it answers to: shared by the
app (app/main.py), the connection layer (app/server.py) and the health check answered at accept
(app/health.py), which must agree without importing one another."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.1,::1"
HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,252}))(:\d{1,5})?")
# Only this server's own scripts and styles (no inline ones, no eval), images from here or data:
# URIs (the legends' swatches), no plugins, no framing, forms post only here.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on a form post
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def host_in(host: str, allowed: set[str]) -> bool:
    # a Host is a name or an address and a port, nothing else: "evil.com@127.0.0.1:8000" parses
    # as user info and 127.0.0.1, and a proxy or a cache may key on the other half
    if not HOST_HEADER.fullmatch(host):
        return False
    return "*" in allowed or (urlsplit(f"//{host}").hostname or "") in allowed


def host_allowed(host: str) -> bool:
    """`host` is one this server answers to (VRAMPLAN_ALLOWED_HOSTS), as RequestGuard checks it."""
    names = os.environ.get("VRAMPLAN_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS).split(",")
    return host_in(host, {n.strip().lower() for n in names if n.strip()})
