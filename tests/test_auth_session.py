"""The browser session (issue 25, item 13): the cookie carries a signed issued-at and a per-session
nonce kept in the data directory; it expires after SESSION_MAX_AGE_S and signing out revokes it on
the server, so a copy of the cookie kept elsewhere signs nobody in again."""

from __future__ import annotations

import time

from app import auth
from tests.test_runs_api import TOKEN, client, root  # noqa: F401  (fixtures)


def _sign_in(client) -> str:
    response = client.post("/login", data={"token": TOKEN, "next": "/runs"}, follow_redirects=False)
    assert response.status_code == 303
    header = response.headers["set-cookie"]
    assert "Max-Age=604800" in header and "HttpOnly" in header and "SameSite=Strict" in header
    name = auth.cookie_name("testserver")
    return header.split(";")[0].removeprefix(name + "=")


def _as(client, value: str):
    client.cookies.clear()
    return client.get("/api/v1/runs", headers={"Cookie": f"{auth.cookie_name('testserver')}={value}"})


def test_a_cookie_used_after_sign_out_is_refused(client, root):
    value = _sign_in(client)
    nonce = value.split(".")[0]
    assert (auth.sessions_dir() / nonce).is_file()
    assert _as(client, value).status_code == 200
    # sign out with that cookie; a copy kept elsewhere is refused afterwards
    client.cookies.clear()
    out = client.post("/logout", headers={"Origin": "http://testserver", "Cookie": f"{auth.cookie_name('testserver')}={value}"},
                      follow_redirects=False)
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    assert not (auth.sessions_dir() / nonce).exists()
    assert _as(client, value).status_code == 401
    page = client.get("/runs", headers={"Cookie": f"{auth.cookie_name('testserver')}={value}"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    # a fresh sign-in works, with a new nonce
    again = _sign_in(client)
    assert again.split(".")[0] != nonce and _as(client, again).status_code == 200


def test_an_expired_cookie_is_refused(client, root, monkeypatch):
    value = _sign_in(client)
    assert _as(client, value).status_code == 200
    real = time.time
    monkeypatch.setattr(auth.time, "time", lambda: real() + auth.SESSION_MAX_AGE_S + 60)
    assert _as(client, value).status_code == 401
    monkeypatch.setattr(auth.time, "time", real)
    assert _as(client, value).status_code == 200


def test_a_forged_or_unlisted_cookie_is_refused(client, root):
    value = _sign_in(client)
    nonce, issued, mac = value.split(".")
    # a later issued-at with the old signature: the HMAC no longer matches
    assert _as(client, f"{nonce}.{int(issued) + 100}.{mac}").status_code == 401
    # a correctly signed value whose nonce was never listed (the old fixed HMAC of the token is gone too)
    unlisted = auth.CREDENTIALS.session_value(TOKEN)
    assert _as(client, unlisted).status_code == 401
    assert _as(client, "../../token.1.x").status_code == 401
    assert _as(client, value).status_code == 200
