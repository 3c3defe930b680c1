"""A custom memory size with a named GPU: the verdict says what it was against (the name alone
stood for the GPU's own memory: "19.00 GiB usable on H100" for 20 GiB)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan

ARGS = ["check", "Qwen/Qwen2.5-0.5B", "--method", "lora", "--gpu", "H100", "--gpu-memory-gib", "20", "--no-simulate-allocator"]


def test_the_cli_verdict_names_the_custom_memory(capsys):
    from app.cli import main

    main(ARGS)
    out = capsys.readouterr().out
    assert "usable on H100 with 20 GiB (gpu_memory_gib)" in out
    assert "usable on H100 (" not in out


def test_the_plan_says_so_and_the_api_carries_the_label():
    plan = build_plan(load_catalog_spec("Qwen/Qwen2.5-0.5B"), TrainingOptions(gpu="H100", gpu_memory_gib=20, simulate_allocator=False))
    assert "planned against gpu_memory_gib 20 GiB, not H100's own memory" in plan.assumptions
    assert plan.to_dict()["gpu"]["label"] == "H100 with 20 GiB (gpu_memory_gib)"
    named = build_plan(load_catalog_spec("Qwen/Qwen2.5-0.5B"), TrainingOptions(gpu="H100", simulate_allocator=False)).gpu
    assert named.label == named.name and "gpu_memory_gib" not in named.label


def test_the_page_summary_names_the_custom_memory():
    from app.main import create_app

    with TestClient(create_app()) as client:
        page = client.get("/", params={"model": "Qwen/Qwen2.5-0.5B", "gpu": "H100", "gpu_memory_gib": "20", "simulate_allocator": "false"})
    assert page.status_code == 200
    assert "H100 with 20 GiB (gpu_memory_gib)" in page.text
