"""What LoRA saves for backward that TinyLoRA does not, measured with autograd's saved-tensor hooks.

Why bench/published.py skips PEFT's TinyLoRA run (PMC-5) rather than plan it as LoRA r=2: on a
small Llama with bf16 weights and fp32 adapters (PEFT's default), each LoRA-adapted Linear saves
an fp32 copy of its input for lora_A's weight gradient; TinyLoRA's projections are frozen, so its
backward needs no copy of the input. The difference is printed in fp32 copies of a layer's input,
then sized for PMC-5's run (Llama-3.2-3B, q_proj and v_proj, 4 x 768 tokens planned).

    HF_HUB_OFFLINE=1 python bench/tinylora_saved.py
"""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, TinyLoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

GIB = 1 << 30
LAYERS, HIDDEN, BATCH, SEQ = 4, 256, 4, 128
TARGETS = ["q_proj", "v_proj"]


def saved_bytes(adapter_config) -> int:
    """Bytes of the distinct storages autograd saves in one forward with labels."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), adapter_config, autocast_adapter_dtype=True)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


def main() -> None:
    lora = saved_bytes(LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    tinylora = saved_bytes(TinyLoraConfig(r=2, target_modules=TARGETS))
    one_copy = BATCH * SEQ * HIDDEN * 4  # one layer input, fp32
    copies_per_layer = (lora - tinylora) / one_copy / LAYERS
    # PMC-5: Llama-3.2-3B (28 layers, hidden 3072), batch 4, sequences planned at the 768 cap
    pmc5 = copies_per_layer * 28 * 4 * 768 * 3072 * 4
    print(json.dumps({
        "lora_saved_bytes": lora, "tinylora_saved_bytes": tinylora,
        "fp32_input_copies_per_layer": round(copies_per_layer, 3),
        "pmc5_difference_gib": round(pmc5 / GIB, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
