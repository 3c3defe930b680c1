"""Faults that are the server's, not the request's (issue 25, items 7 and 9): a damaged, deleted,
replaced or unwritable run store is a 503 saying what failed and what to do, and /healthz says so;
a bug is a 500 with an id in the log; what is the user's input (a NUL byte, a name too long,
~nosuchuser, a config nested without end) is a 422 naming the field; and the keep-alive connection
goes on serving after any of them."""

from __future__ import annotations

import logging
import socket
import sqlite3

import pytest
from fastapi.testclient import TestClient

from tests.live_server import serving
from tests.served import BEARER, MODEL, TOKEN, client, root  # noqa: F401 (fixtures)


def _fresh_health(client):
    from app import health

    health._cache.clear()
    return client.get("/healthz")


def _storage_error(response, says: str) -> dict:
    assert response.status_code == 503, response.text
    item = response.json()["detail"][0]
    assert item["type"] == "storage_unavailable" and item["loc"] == ["server", "storage"], item
    assert says in item["msg"] and "this input could not be planned" not in item["msg"], item["msg"]
    assert item["id"] in item["msg"]
    return item


def test_a_damaged_store_is_a_503_saying_what_to_do_and_health_says_so(client, root, tmp_path):
    assert _fresh_health(client).json()["status"] == "ok"
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "runs.sqlite").write_bytes(b"this is not SQLite " * 500)
    item = _storage_error(client.get("/api/v1/runs", headers=BEARER), "not a database")
    assert "move the file aside" in item["msg"]
    health = _fresh_health(client)
    assert health.status_code == 503 and health.json()["store"]["ok"] is False
    assert "not a database" in health.json()["store"]["error"] and health.json()["store"]["what_to_do"]
    # the security headers are on the 503s too
    assert health.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("error,says", [
    (sqlite3.OperationalError("attempt to write a readonly database"), "read-only"),
    (sqlite3.OperationalError("database or disk is full"), "full"),
    (OSError(28, "No space left on device"), "full"),
    (OSError(30, "Read-only file system"), "read-only"),
])
def test_an_unwritable_or_full_data_directory_is_a_503(client, root, monkeypatch, error, says):
    from launcher.store import RunStore

    def broken(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(RunStore, "list", broken)
    client.post("/api/v1/runs", json={"model": MODEL, "dataset": str(root / "train.jsonl"), "device": "cpu", "backend": "fake", "max_steps": 1},
                headers=BEARER)  # makes the store
    _storage_error(client.get("/api/v1/runs", headers=BEARER), says)


def test_a_store_deleted_while_serving_is_refused_not_kept_open(client, root, tmp_path):
    body = {"model": MODEL, "dataset": str(root / "train.jsonl"), "device": "cpu", "backend": "fake", "max_steps": 1}
    assert client.post("/api/v1/runs", json=body, headers=BEARER).status_code == 201
    assert len(client.get("/api/v1/runs", headers=BEARER).json()["runs"]) == 1
    store = tmp_path / "data" / "runs.sqlite"
    for suffix in ("", "-wal", "-shm"):
        store.with_name(store.name + suffix).unlink(missing_ok=True)
    _storage_error(client.get("/api/v1/runs", headers=BEARER), "deleted")
    _storage_error(client.post("/api/v1/runs", json=body, headers=BEARER), "deleted")  # no launch into a file nobody will read
    health = _fresh_health(client)
    assert health.status_code == 503 and "deleted" in health.json()["store"]["error"]


def test_a_store_replaced_while_serving_is_reopened(client, root, tmp_path):
    from launcher.store import RunStore

    body = {"model": MODEL, "dataset": str(root / "train.jsonl"), "device": "cpu", "backend": "fake", "max_steps": 1}
    assert client.post("/api/v1/runs", json=body, headers=BEARER).status_code == 201
    assert len(client.get("/api/v1/runs", headers=BEARER).json()["runs"]) == 1
    store = tmp_path / "data" / "runs.sqlite"
    other = tmp_path / "data" / "other.sqlite"
    RunStore(other).close()  # an empty store, moved over the one in use (a restored backup)
    for suffix in ("-wal", "-shm"):
        store.with_name(store.name + suffix).unlink(missing_ok=True)
    other.replace(store)
    listed = client.get("/api/v1/runs", headers=BEARER).json()
    assert listed["runs"] == []  # the file now there, not the one that was
    # the run's directory is not in the store now there: said, never an empty list unexplained
    if (tmp_path / "data" / "runs").is_dir() and any((tmp_path / "data" / "runs").iterdir()):
        assert "not in the run store" in listed["warning"] and listed["orphaned_run_dirs"]
        health = _fresh_health(client)
        assert health.status_code == 503 and health.json()["store"]["orphaned_run_dirs"]
    else:
        assert _fresh_health(client).status_code == 200


def test_the_store_refuses_use_after_its_file_is_deleted(tmp_path):
    from launcher.store import RunStore, StoreUnavailable

    store = RunStore(tmp_path / "runs.sqlite")
    (tmp_path / "runs.sqlite").unlink()
    with pytest.raises(StoreUnavailable, match="deleted"):
        store.list()
    store.close()


# -- input errors name the field; bugs are 500 with an id ------------------------------------------

@pytest.mark.parametrize("field,value,says", [
    ("dataset", "data\x00set.jsonl", "NUL"),
    ("dataset", "~nosuchuser/train.jsonl", "no user 'nosuchuser'"),
    ("dataset", "d/" + "a" * 300 + ".jsonl", "at most 255"),
    ("model", "~nosuchuser/model", "no user 'nosuchuser'"),
    ("model", "/" + "m" * 280, "at most 255"),
    ("reward_model", "rm\x00.bin", "NUL"),
])
def test_paths_no_file_system_has_are_the_fields_422(client, root, field, value, says):
    body = {"model": MODEL, "dataset": str(root / "train.jsonl"), "device": "cpu", "backend": "fake", "max_steps": 1, field: value}
    if field == "reward_model":
        body["stage"] = "grpo"
    response = client.post("/api/v1/runs/dry-run", json=body, headers=BEARER)
    assert response.status_code == 422, response.text
    item = response.json()["detail"][0]
    assert item["loc"] == ["body", field] and says in item["msg"], item


def test_a_config_nested_without_end_is_a_422_on_config_json(client):
    response = client.post("/api/v1/plan", json={"config_json": '{"a": ' + "[" * 5000 + "]" * 5000 + "}"})
    assert response.status_code == 422, response.text
    item = response.json()["detail"][0]
    assert item["loc"] == ["body", "config_json"] and "nests" in item["msg"]


def _app_with_a_bug():
    from app.main import create_app

    app = create_app()

    @app.get("/api/v1/bug")
    def bug():
        raise ValueError("a bug, not the request's fault")

    @app.get("/api/v1/disk-full")
    def disk_full():
        raise OSError(28, "No space left on device", "/data/runs/x/train.log")

    return app


def test_a_bug_is_a_500_with_an_id_in_the_log(caplog):
    with TestClient(_app_with_a_bug(), raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR, "vramplan"):
        response = client.get("/api/v1/bug")
    assert response.status_code == 500, response.text
    item = response.json()["detail"][0]
    assert item["type"] == "internal_error" and "could not be planned" not in item["msg"] and item["id"] in item["msg"]
    assert any(item["id"] in r.getMessage() and r.exc_info for r in caplog.records)
    assert response.headers["content-security-policy"]


def test_the_connection_stays_usable_after_a_500_and_a_503():
    """Starlette re-raises what its catch-all handler answered; uvicorn then closed the keep-alive
    connection without `Connection: close`, and the client's next request on it failed."""
    with serving(_app_with_a_bug()) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            replies = []
            for path in ("/api/v1/bug", "/api/v1/disk-full", "/healthz"):
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                replies.append(_read_response(sock))
    assert [r[0] for r in replies] == [500, 503, 200], replies


def _read_response(sock) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return (0, data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ")[1]), head


def test_a_config_nested_without_end_is_bad_input_everywhere(tmp_path, capsys):
    """The CLI reads a config file with Python's parser, which recurses: a deep one is the
    user's input (exit 2, one line), not a RecursionError's stack trace."""
    from app.cli import main

    config = tmp_path / "config.json"
    config.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["plan", str(config), "--no-simulate-allocator"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nests deeper than a config.json does" in err
