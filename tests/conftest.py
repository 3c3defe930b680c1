import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Starlette's test client sends Host: testserver; the app answers only to names it is given
os.environ.setdefault("VRAMPLAN_ALLOWED_HOSTS", "localhost,127.0.0.1,::1,testserver")
# A single plan simulates the allocator by default (seconds each): the suite plans hundreds, so it
# uses the formula unless a test asks; tests of the default unset this (tests/test_simulate_default.py)
os.environ.setdefault("VRAMPLAN_SIMULATE_ALLOCATOR", "off")
# traces are not kept on disk between tests (nor in the developer's cache); tests/test_trace_cache.py asks
os.environ.setdefault("VRAMPLAN_TRACE_CACHE", "off")
# the host admission (launcher/admission.py) would refuse launches on a machine the suite itself
# keeps busy; tests/test_admission.py sets its own limits
os.environ.setdefault("VRAMPLAN_MAX_LOAD_PER_CPU", "0")
os.environ.setdefault("VRAMPLAN_MAX_LOCAL_RUNS", "64")
# the app makes its token and run store in the data dir at start: never the developer's own
import tempfile  # noqa: E402

os.environ.setdefault("VRAMPLAN_DATA_DIR", tempfile.mkdtemp(prefix="vramplan-test-data-"))

import pytest  # noqa: E402

# Tiny configs of real catalog architectures: GQA, qkv bias, tied embeddings, q/k norms, fused
# qkv and gate_up (Phi-3), post-norms (OLMo 2), MoE (fused experts).
TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=160, moe_intermediate_size=48, num_experts=4,
                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope="session")
def tiny_specs():
    from planner.introspect import spec_from_config

    return {name: spec_from_config(cfg, name) for name, cfg in TINY.items()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny random Llama with its in-process tokenizer and a dataset per stage, built once a session
    (about 5 s) for every test that launches a real run."""
    from tests.tinyrun import make_tiny_model, write_datasets

    root = tmp_path_factory.mktemp("tiny-run")
    return {"model": make_tiny_model(root / "model"), **write_datasets(root)}



@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Node ids pytest-xdist can schedule by, under pytest 9 (which keeps an item's id structured in
    `_id`; the `_nodeid` that schemathesis and xdist set is no longer read):
    - schemathesis names each API operation's test "test_...[GET /path]" but gives them all the
      function's id, and xdist keys its work by id: under -n all but one operation of a file would
      silently not run (2,085 of 2,104 tests reported); each gets its own id;
    - `--dist loadgroup` keeps a group's tests in one worker by the "@group" suffix its own hook puts
      on `_nodeid`; it is put on the id itself here, or the groups (test_ray's head, test_slurm's
      cluster, the browser files' shared server) are spread over the workers."""
    from _pytest.nodeid import NodeId

    grouping = bool(config.getvalue("loadgroup")) if hasattr(config.option, "loadgroup") else False
    for item in items:
        if not hasattr(item, "_id"):  # an older pytest reads _nodeid, which both plugins set themselves
            continue
        if "[" in item.name and "[" not in item.nodeid:
            item._id = item._id.with_params(item.name.split("[", 1)[1].removesuffix("]"))
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
        if grouping and groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
