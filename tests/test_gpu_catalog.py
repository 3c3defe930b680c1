"""The GPU catalog's data and the hardware rules plans follow."""

import pytest

from gpu_catalog.catalog import all_gpus, find_gpu, lookup_gpu
from planner.catalog import load_catalog_spec
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import build_plan

LLAMA8B = load_catalog_spec("meta-llama/Llama-3.1-8B")


def _cc(gpu):
    major, minor = gpu.compute_capability.split(".")
    return int(major), int(minor)


def test_catalog_covers_the_issue_list():
    wanted = [
        "RTX 2080 Ti", "RTX 3060", "RTX 3080 10GB", "RTX 3080 12GB", "RTX 3090", "RTX 4090", "RTX 5090", "RTX A4000",
        "RTX A6000", "RTX 4000 Ada", "RTX 5000 Ada", "RTX 6000 Ada", "T4", "V100 16GB", "V100 32GB", "A10", "A10G", "L4",
        "L40S", "A100 40GB PCIe", "A100 40GB SXM", "A100 80GB PCIe", "A100 80GB SXM", "H100 PCIe", "H100 SXM", "H100 NVL",
        "H200", "B200", "GH200", "MI250X", "MI300X",
    ]
    for name in wanted:
        find_gpu(name)  # raises if missing or ambiguous
    assert len(all_gpus()) >= 40


def test_every_gpu_has_its_facts():
    names = [g.name for g in all_gpus()]
    assert len(names) == len(set(names))
    aliases = [a for g in all_gpus() for a in g.aliases]
    assert len(aliases) == len(set(aliases)), "an alias must name one GPU"
    for gpu in all_gpus():
        assert gpu.memory_mib > 4096 and gpu.bf16_tflops_dense > 0 and gpu.memory_bandwidth_gbs > 0, gpu.name
        assert gpu.vendor in ("nvidia", "amd") and gpu.segment in ("consumer", "workstation", "datacenter")
        if gpu.vendor == "nvidia":
            # bf16 tensor cores from Ampere (8.0), FP8 from Ada (8.9)
            assert gpu.bf16 == (_cc(gpu) >= (8, 0)), gpu.name
            assert gpu.fp8 == (_cc(gpu) >= (8, 9)), gpu.name
        else:
            assert gpu.compute_capability is None and gpu.arch.startswith("gfx")
        assert gpu.price_per_hour_usd is None or 0.05 < gpu.price_per_hour_usd < 20


@pytest.mark.parametrize("query,name", [("RTX 4000 Ada", "NVIDIA RTX 4000 Ada Generation"), ("4090", "NVIDIA GeForce RTX 4090"),
                                        ("a100 80gb", "NVIDIA A100-SXM4-80GB"), ("H100 SXM", "NVIDIA H100 80GB HBM3"),
                                        ("nvidia a100-sxm4-40gb", "NVIDIA A100-SXM4-40GB")])
def test_fuzzy_names_resolve(query, name):
    assert find_gpu(query).name == name


@pytest.mark.parametrize("query,name", [("RTX4090", "NVIDIA GeForce RTX 4090"), ("rtx4000ada", "NVIDIA RTX 4000 Ada Generation"),
                                        ("rtx 4000 ada", "NVIDIA RTX 4000 Ada Generation"), ("RTX-4000-Ada", "NVIDIA RTX 4000 Ada Generation"),
                                        ("H100SXM", "NVIDIA H100 80GB HBM3")])
def test_names_resolve_whatever_the_case_spaces_and_hyphens(query, name):
    match = lookup_gpu(query)
    assert match.gpu.name == name and match.note is None


@pytest.mark.parametrize("query,pick,others", [
    ("a100", "NVIDIA A100-SXM4-80GB", ["NVIDIA A100-PCIE-40GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe"]),
    ("H100", "NVIDIA H100 80GB HBM3", ["NVIDIA H100 PCIe", "NVIDIA H100 NVL"]),
    ("v100", "Tesla V100-SXM2-16GB", ["Tesla V100-PCIE-16GB", "Tesla V100-SXM2-32GB"]),
    ("3080", "NVIDIA GeForce RTX 3080", ["NVIDIA GeForce RTX 3080 12GB"]),
    ("a100 pcie", "NVIDIA A100 80GB PCIe", ["NVIDIA A100-PCIE-40GB"]),  # no usual variant: the most memory
])
def test_a_line_name_picks_its_usual_card_and_says_so(query, pick, others):
    match = lookup_gpu(query)
    assert match.gpu.name == pick and find_gpu(query).name == pick
    assert f"planned on {pick}" in match.note and all(name in match.note for name in others)


@pytest.mark.parametrize("query", ["ada", "pcie", "rtx"])
def test_names_spanning_several_lines_list_the_candidates(query):
    with pytest.raises(PlanInputError) as err:
        find_gpu(query)
    assert "ambiguous" in err.value.reason and err.value.reason.count("NVIDIA") + err.value.reason.count("Tesla") >= 2


def test_unknown_gpu_suggests_the_closest():
    with pytest.raises(PlanInputError) as err:
        find_gpu("RTX 4090 Tie")
    assert "closest" in err.value.reason and "RTX 4090" in err.value.reason


def test_no_bf16_before_ampere_falls_back_to_fp16_and_says_so():
    plan = build_plan(LLAMA8B, TrainingOptions(method="qlora", gpu="V100 32GB"))
    assert plan.options.precision == "fp16"
    assert any("no bf16" in a for a in plan.assumptions)
    assert build_plan(LLAMA8B, TrainingOptions(method="qlora", gpu="A10G")).options.precision == "bf16"


def test_flash_attention_needs_ampere():
    plan = build_plan(LLAMA8B, TrainingOptions(method="qlora", gpu="RTX 2080 Ti", attention="flash"))
    assert plan.options.attention == "sdpa" and any("FlashAttention" in a for a in plan.assumptions)


def test_bitsandbytes_on_amd_is_planned_with_a_note():
    plan = build_plan(LLAMA8B, TrainingOptions(method="qlora", gpu="MI300X"))
    assert any("not a CUDA GPU" in a and "ROCm" in a for a in plan.assumptions)
    lora = build_plan(LLAMA8B, TrainingOptions(method="lora", gpu="MI300X"))
    assert not any("ROCm" in a for a in lora.assumptions)
