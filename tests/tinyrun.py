"""A tiny random Llama with a tokenizer trained in-process, and small datasets for every stage.

No downloads: the tokenizer is a byte-level BPE trained here with the `tokenizers` library, the
model is built from a config with random weights. Used by the launcher's real runs on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path


def make_tiny_model(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    texts = [f"Is {i} even? The number {i} is {'even' if i % 2 == 0 else 'odd'}: {'yes' if i % 2 == 0 else 'no'}." for i in range(300)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_datasets(out: Path) -> dict[str, Path]:
    """One JSONL per data shape: chat (SFT), preference pairs (DPO, ORPO, SimPO, reward), KTO labels, prompts (GRPO, RLOO)."""
    answer = lambda i: "yes" if i % 2 == 0 else "no"
    shapes = {
        "sft": [{"messages": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": answer(i)}]} for i in range(48)],
        "pref": [{"prompt": f"Is {i} even?", "chosen": answer(i), "rejected": answer(i + 1)} for i in range(48)],
        "kto": [{"prompt": f"Is {i} even?", "completion": "yes", "label": i % 2 == 0} for i in range(48)],
        "prompts": [{"prompt": f"Is {i} even?"} for i in range(48)],
    }
    paths = {}
    for name, rows in shapes.items():
        path = out / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        paths[name] = path
    return paths
