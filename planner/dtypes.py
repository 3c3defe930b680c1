"""Bytes per element and the bitsandbytes storage formats, as the libraries lay them out."""

from __future__ import annotations

import math

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "uint8": 1}

# bitsandbytes 4-bit (NF4/FP4): two values per byte, one absmax per 64-value block.
BNB_4BIT_BLOCKSIZE = 64
# Double quantization stores block absmax as uint8, with an fp32 absmax per 256 of them.
BNB_NESTED_BLOCKSIZE = 256
BNB_4BIT_CODE_BYTES = 16 * 4  # each QuantState keeps its own 16-entry fp32 code table
BNB_NESTED_CODE_BYTES = 256 * 4  # and the nested state its own 256-entry fp32 dynamic map
BNB_NESTED_OFFSET_BYTES = 4  # the fp32 mean subtracted before quantizing absmax


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def packed_4bit_bytes(numel: int) -> int:
    return (numel + 1) // 2


def quant_constants_4bit_bytes(numel: int, double_quant: bool) -> int:
    """QuantState bytes of one 4-bit weight: absmax per block plus code tables."""
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    if not double_quant:
        return blocks * 4 + BNB_4BIT_CODE_BYTES
    nested_blocks = math.ceil(blocks / BNB_NESTED_BLOCKSIZE)
    return blocks + nested_blocks * 4 + BNB_NESTED_OFFSET_BYTES + BNB_4BIT_CODE_BYTES + BNB_NESTED_CODE_BYTES


def int8_constants_bytes(out_features: int) -> int:
    """LLM.int8 keeps one fp32 scale (SCB) per output row."""
    return out_features * 4
