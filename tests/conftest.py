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
