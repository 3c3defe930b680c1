"""The guard on what can start processes: a token, a login cookie, and the checks on every request.

A server that launches training runs executes code by design, so the routes that start, stop or
show runs (and, with `VRAMPLAN_AUTH=all`, every route) need a credential:

- the token: 32 random bytes made at the first start (`vramplan serve` prints the sign-in URL with
  it, as Jupyter does), kept in `<data dir>/token`, a plain file of ours with mode 0600 in a 0700
  directory, refused when anyone else could read it; or given as VRAMPLAN_TOKEN (16 characters or
  more). An API client sends it as `Authorization: Bearer TOKEN`.
- a browser signs in once on /login (a POST: no GET changes state) and gets a session cookie,
  never the token itself: `NONCE.ISSUED.HMAC` (a random per-session nonce, the Unix time it was
  issued and an HMAC of both keyed by the token). HttpOnly, SameSite=Strict, Path=/, Secure on
  https, Max-Age 7 days (SESSION_MAX_AGE_S), named per port so two servers on one host do not sign
  each other out. EventSource sends it too. The cookie is refused once older than the maximum age
  (whatever the browser keeps), when the token changed, and when its nonce is not listed in
  `<data dir>/sessions/` (one file per signed-in session, removed at sign-out): signing out revokes
  the session on the server, not only in the browser that signed out.

A request the browser could have been tricked into (cookie credentials, any method but GET/HEAD/
OPTIONS) must also prove it comes from this server's own pages: its Origin is this server's, or its
Sec-Fetch-Site is same-origin. A Bearer request needs no such proof: no page on another site can
set that header without a CORS preflight, which this server never answers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

TOKEN_FILE = "token"
MIN_TOKEN_CHARS = 16
COOKIE_PREFIX = "vramplan_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# routes that start, stop or show runs: the token is needed whatever the mode
GUARDED_PREFIXES = ("/api/v1/runs", "/api/v1/merges", "/api/v1/backends", "/runs", "/launch")
# what stays open when VRAMPLAN_AUTH=all (signing in must be possible, health must be checkable)
OPEN_PATHS = ("/login", "/healthz")
OPEN_PREFIXES = ("/static/",)
AUTH_MODES = ("launch", "all")
SESSIONS_DIR = "sessions"
SESSION_MAX_AGE_S = 7 * 24 * 3600
SESSION_CLOCK_SKEW_S = 300  # a cookie issued "in the future" by more than this is refused
_NONCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class TokenError(RuntimeError):
    """The token cannot be made or read safely; the message says what to do."""


def data_dir() -> Path:
    from launcher.supervisor import default_data_dir

    return default_data_dir().expanduser().resolve()


def auth_mode() -> str:
    mode = os.environ.get("VRAMPLAN_AUTH", "launch").strip().lower() or "launch"
    return mode if mode in AUTH_MODES else "all"  # a typo must not open the server


def _check_token_text(token: str, where: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the token in {where} is shorter than {MIN_TOKEN_CHARS} characters")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise TokenError(f"the token in {where} must be printable ASCII without spaces")
    return token


def read_or_create_token(directory: Path | None = None, create: bool = True) -> tuple[str | None, bool]:
    """(token, whether it was made now). VRAMPLAN_TOKEN wins; else `<directory>/token`, made when
    missing (and `create`). TokenError when the file is not ours alone or not a plain file."""
    env = os.environ.get("VRAMPLAN_TOKEN")
    if env is not None:
        return _check_token_text(env, "VRAMPLAN_TOKEN"), False
    directory = directory or data_dir()
    path = directory / TOKEN_FILE
    try:
        info = path.lstat()  # a symlink is refused, never followed
    except FileNotFoundError:
        if not create:
            return None, False
        return _create_token(directory, path)
    if not stat.S_ISREG(info.st_mode):
        raise TokenError(f"{path} is not a plain file: remove it and start again to make a new token")
    if info.st_uid != os.getuid():
        raise TokenError(f"{path} belongs to another user: remove it and start again to make a new token")
    if info.st_mode & 0o077:
        raise TokenError(f"{path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}): it may have leaked; "
                         "remove it and start again to make a new token")
    return _check_token_text(path.read_text(), str(path)), False


def _create_token(directory: Path, path: Path) -> tuple[str, bool]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    token = secrets.token_urlsafe(32)
    # written whole under another name, then linked into place: a second process starting at the
    # same moment reads either no file or the whole token, and exactly one token wins
    staging = directory / f".token-{secrets.token_hex(8)}"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        try:
            os.link(staging, path)
        except FileExistsError:
            return read_or_create_token(directory, create=False)[0], False
    finally:
        staging.unlink(missing_ok=True)
    return token, True


class Credentials:
    """Checks what a request presents. The token is read once per data directory and kept."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str | None], str] = {}

    def token(self, create: bool = True) -> str | None:
        directory = data_dir()
        key = (str(directory), os.environ.get("VRAMPLAN_TOKEN"))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            token, _ = read_or_create_token(directory, create=create)
            if token is not None:
                self._cache[key] = token
            return token

    def session_value(self, token: str | None = None, nonce: str | None = None, issued: int | None = None) -> str:
        """The cookie value `NONCE.ISSUED.HMAC` for a session (a new nonce and now when not given).
        The value alone signs nobody in: its nonce must also be listed (new_session does both)."""
        token = token or self.token()
        nonce = nonce or secrets.token_urlsafe(18)
        issued = int(time.time()) if issued is None else int(issued)
        return f"{nonce}.{issued}.{_session_mac(token, nonce, issued)}"

    def new_session(self, token: str | None = None) -> str:
        """Sign a browser in: a fresh nonce listed in `<data dir>/sessions/`, and its cookie value.
        Expired sessions' files are removed on the way."""
        token = token or self.token()
        directory = sessions_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _prune_sessions(directory)
        value = self.session_value(token)
        nonce, issued, _ = value.split(".")
        fd = os.open(directory / nonce, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(issued + "\n")
        return value

    def end_session(self, value: str | None) -> bool:
        """Sign out: the session's nonce is removed, so its cookie is refused from now on, in any
        browser that kept it. True when a listed session was removed."""
        parsed = _parse_session(value or "")
        if parsed is None:
            return False
        try:
            (sessions_dir() / parsed[0]).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return False

    def session_valid(self, value: str, token: str, now: float | None = None) -> bool:
        """Signed by this token, younger than SESSION_MAX_AGE_S, and its nonce still listed."""
        parsed = _parse_session(value)
        if parsed is None:
            return False
        nonce, issued, mac = parsed
        if not hmac.compare_digest(mac.encode(), _session_mac(token, nonce, issued).encode()):
            return False
        now = time.time() if now is None else now
        if issued > now + SESSION_CLOCK_SKEW_S or now - issued > SESSION_MAX_AGE_S:
            return False
        try:
            return (sessions_dir() / nonce).is_file()
        except OSError:
            return False

    def identify(self, headers: dict[str, str], host: str, bearer: bool = True) -> str | None:
        """"bearer", "cookie", "bad_bearer" (a wrong token was sent) or None (nothing sent).
        `bearer`: look at the Authorization header too (the guarded routes, and any request that
        sends one). The token is only read when something was presented,
        so a server nobody signs in to never touches the data directory."""
        authorization = headers.get("authorization", "") if bearer else ""
        cookie = _cookies(headers.get("cookie", "")).get(cookie_name(host))
        if not authorization and not cookie:
            return None
        try:
            token = self.token(create=False)  # made at start (app/main.py's lifespan, vramplan serve), never by a request
        except (TokenError, OSError):
            token = None
        if token is None:
            return "bad_bearer" if authorization else None
        if authorization:
            scheme, _, given = authorization.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
                return "bearer"
            return "bad_bearer"
        if self.session_valid(cookie, token):
            return "cookie"
        return None  # a stale cookie (expired, signed out, or the token changed): as if signed out


def sessions_dir() -> Path:
    return data_dir() / SESSIONS_DIR


def _session_mac(token: str, nonce: str, issued: int) -> str:
    message = f"vramplan browser session v2|{nonce}|{issued}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def _parse_session(value: str) -> tuple[str, int, str] | None:
    """(nonce, issued, mac) of a well-formed cookie value, else None (the nonce names a file:
    only URL-safe characters, never a path)."""
    parts = value.split(".")
    if len(parts) != 3 or len(value) > 200:
        return None
    nonce, issued, mac = parts
    if not (16 <= len(nonce) <= 64) or not set(nonce) <= _NONCE_CHARS or not issued.isdigit() or len(issued) > 12:
        return None
    return nonce, int(issued), mac


def _prune_sessions(directory: Path) -> None:
    """Remove the files of sessions past their maximum age (best effort)."""
    cutoff = time.time() - SESSION_MAX_AGE_S
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            continue


CREDENTIALS = Credentials()


def cookie_name(host: str) -> str:
    try:
        port = urlsplit(f"//{host}").port if host else None
    except ValueError:  # "localhost:abc": no port to name the cookie by
        port = None
    return f"{COOKIE_PREFIX}_{port or 80}"


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in out:
            out[name] = value.strip().strip('"')
    return out


def needs_credentials(path: str) -> bool:
    if path.startswith(GUARDED_PREFIXES):
        return True
    if auth_mode() == "all":
        return not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))
    return False


def same_origin(headers: dict[str, str], host: str) -> bool:
    """The browser says this request comes from one of this server's own pages."""
    origin = headers.get("origin")
    if origin and origin != "null":
        return urlsplit(origin).netloc.lower() == host.lower()
    return headers.get("sec-fetch-site") == "same-origin"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this server, never another site ("//evil", "/\\evil")."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or len(target) > 2000:
        return "/runs"
    if any(ord(c) < 32 for c in target):
        return "/runs"
    return target


def login_url(next_path: str) -> str:
    return "/login?next=" + quote(next_path, safe="/")


def session_cookie(host: str, secure: bool, value: str, max_age: int | None = SESSION_MAX_AGE_S) -> str:
    parts = [f"{cookie_name(host)}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
