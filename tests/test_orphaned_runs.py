"""A store deleted while its runs' directories remain, then a restart (issue 25, item 7): /healthz is
503 naming the directories and what to do, and the runs list says so beside its empty list, rather
than showing nothing unexplained."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.test_runs_api import BEARER, body, finished, root  # noqa: F401  (fixtures)


def test_a_deleted_store_with_runs_left_is_said_after_a_restart(root, tmp_path):
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        run = client.post("/api/v1/runs", json=body(root), headers=BEARER)
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
        finished(client, run_id)
        assert client.get("/healthz").status_code == 200
        assert "warning" not in client.get("/api/v1/runs", headers=BEARER).json()
    data = tmp_path / "data"
    run_dir = data / "runs" / run_id
    assert run_dir.is_dir()
    for name in ("runs.sqlite", "runs.sqlite-wal", "runs.sqlite-shm"):
        (data / name).unlink(missing_ok=True)

    from app import health as health_module

    health_module._cache.clear()  # the first server's answer, cached for a second
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        health = client.get("/healthz")
        assert health.status_code == 503, health.text
        store = health.json()["store"]
        assert store["ok"] is False and str(run_dir) in store["orphaned_run_dirs"]
        assert "backup" in store["what_to_do"] and "move the directories" in store["what_to_do"]
        listed = client.get("/api/v1/runs", headers=BEARER)
        assert listed.status_code == 200
        answer = listed.json()
        assert answer["runs"] == [] and str(run_dir) in answer["orphaned_run_dirs"] and "not in the run store" in answer["warning"]
        # moving the directories aside (the documented choice to keep the new store) clears it
        run_dir.rename(tmp_path / "kept")
        health_module._cache.clear()
        assert client.get("/healthz").status_code == 200
        assert "warning" not in client.get("/api/v1/runs", headers=BEARER).json()
