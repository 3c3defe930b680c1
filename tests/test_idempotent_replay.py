"""An Idempotency-Key retry is answered from the stored run before anything is planned or built, in
every case (issue 25, item 12), and the same key with another body is the 422 conflict, also before
any build."""

from __future__ import annotations

from app.runs import WebRuns
from tests.test_runs_api import BEARER, body, client, root  # noqa: F401  (fixtures)


def test_a_retry_is_answered_before_any_build(client, root, monkeypatch):
    key = {**BEARER, "Idempotency-Key": "replay-1"}
    first = client.post("/api/v1/runs", json=body(root), headers=key)
    assert first.status_code == 201, first.text

    built = []

    def no_build(self, request):
        built.append(request)
        raise AssertionError("a retry must not plan or build the model again")

    monkeypatch.setattr(WebRuns, "prepare", no_build)
    again = client.post("/api/v1/runs", json=body(root), headers=key)
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == first.json()["id"]
    # a retry that adds force or queue is still the same request
    forced = client.post("/api/v1/runs", json=body(root, force=True), headers=key)
    assert forced.json()["id"] == first.json()["id"]
    other = client.post("/api/v1/runs", json=body(root, max_steps=7), headers=key)
    assert other.status_code == 422, other.text
    detail = other.json()
    assert detail["detail"][0]["loc"] == ["header", "Idempotency-Key"] and detail["detail"][0]["type"] == "idempotency_key_reused"
    assert detail["run_id"] == first.json()["id"]
    assert built == []
    # a new key is planned as usual
    fresh = client.post("/api/v1/runs", json=body(root), headers={**BEARER, "Idempotency-Key": "replay-2"})
    assert fresh.status_code == 500 or built, fresh.text
