"""The page's form: its fields, and its text turned into the request model the API takes.

Shared by the plan pages and the launch pages, so a field typed the same way means the same thing
on both.
"""

from __future__ import annotations

import re
import typing
from urllib.parse import urlencode

from app.service import AdviseRequest
from planner.options import TrainingOptions

# Form fields that are text inputs in the page but typed in the request model
FORM_FIELDS = (
    "model", "gpu", "gpu_memory_gib", "num_gpus", "method", "stage", "batch_size", "gradient_accumulation_steps", "seq_len", "gradient_checkpointing",
    "optimizer", "precision", "weights_dtype", "autocast", "prepare_model_for_kbit_training", "autocast_adapter_dtype", "use_reentrant", "modules_to_save", "ensure_weight_tying", "trainable_token_indices", "simulate_allocator", "attention", "trainer", "parallelism", "offload", "lora_r", "lora_alpha",
    "lora_targets", "lora_dropout", "goal", "data_kind", "num_examples", "tokens_per_example", "tenants", "config_json", "allocator",
)
# Every other plan option is taken from the address too (a link from the CLI's or the API's options
# plans what they plan) and rides along in the form as a hidden field, though the form shows no input for it
QUERY_ONLY_FIELDS = tuple(name for name in TrainingOptions.model_fields if name not in FORM_FIELDS)
FORM_FIELDS = FORM_FIELDS + QUERY_ONLY_FIELDS

# -- the form's text -> the request model ------------------------------------------------------


def _literal_choices(annotation) -> tuple[str, ...]:
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(a for a in typing.get_args(annotation) if isinstance(a, str))
    return tuple(c for arg in typing.get_args(annotation) for c in _literal_choices(arg))


def _choice_key(text: str) -> str:
    return re.sub(r"[\s_-]+", "", text.lower())


# field -> {"qlora": "qlora", "pagedadamw8bit": "paged_adamw_8bit", ...}
_CHOICES = {
    name: {_choice_key(c): c for c in choices}
    for name, info in AdviseRequest.model_fields.items()
    if (choices := _literal_choices(info.annotation))
}


def normalize_choices(raw: dict) -> dict:
    """People type "QLoRA", "ZeRO-3", "paged AdamW 8bit": the API takes the exact names, so the
    page maps case, spaces, hyphens and underscores onto them before validation."""
    return {name: _CHOICES.get(name, {}).get(_choice_key(value), value) for name, value in raw.items()}



_FORM_TRUE, _FORM_FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _mentions_bool(annotation) -> bool:
    return annotation is bool or any(_mentions_bool(arg) for arg in typing.get_args(annotation))


_BOOL_FIELDS = frozenset(name for name, info in AdviseRequest.model_fields.items() if _mentions_bool(info.annotation))


def form_booleans(raw: dict) -> dict:
    """A form sends text; the JSON API takes only true/false, so the form's words become
    booleans here rather than loosening the shared model."""
    out = dict(raw)
    for name in _BOOL_FIELDS & out.keys():
        word = out[name].lower()
        out[name] = True if word in _FORM_TRUE else False if word in _FORM_FALSE else out[name]
    return out


def query_string(raw: dict, **changes: str) -> str:
    """The query string of a page state: given fields only, in the form's order, so the address
    is short and the same state always has the same address."""
    state = {**raw, **changes}
    return urlencode([(name, state[name]) for name in FORM_FIELDS if state.get(name)], safe="/")  # model ids stay legible
