"""What the API and the pages share: request models and the calls into the planner.

The web layer never computes a number: it turns a request into TrainingOptions (and a Task),
asks the planner, and returns the planner's objects as dicts. Models come from the catalog or
from a pasted/uploaded config.json; never from a filesystem path a web user names.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from planner.advisor import Task
from planner.catalog import catalog_ids, closest_ids, load_catalog_spec
from planner.errors import PlanInputError
from planner.model_config import parse_config_text
from planner.options import TrainingOptions
from planner.spec import ModelSpec

MAX_BODY_BYTES = 256 * 1024  # a plan request is a few hundred bytes; a pasted config.json a few KiB


class PlanRequest(TrainingOptions):
    """The plan options plus the model: a catalog id, or a config.json's text."""

    model: str = Field(default="meta-llama/Llama-3.1-8B", max_length=300)
    config_json: str | None = Field(default=None, max_length=MAX_BODY_BYTES)

    def options(self) -> TrainingOptions:
        """The given fields that are plan options, so TrainingOptions knows what was not given."""
        given = self.model_dump(include=self.model_fields_set & set(TrainingOptions.model_fields))
        return TrainingOptions.model_validate(given)


class AdviseRequest(PlanRequest, Task):
    """Plan options, model and the task questions in one body."""

    def task(self) -> Task:
        return Task.model_validate(self.model_dump(include=self.model_fields_set & set(Task.model_fields)))


def resolve_web_model(model: str, config_json: str | None = None) -> ModelSpec:
    """A catalog id, or a config.json given as text. Paths are refused: the server's files are
    not the user's to name."""
    if config_json and config_json.strip():
        try:
            return _spec_from_config_text(config_json.strip())
        except PlanInputError as exc:
            raise PlanInputError("config_json", exc.reason) from None
    catalog_id = catalog_ids().get(model.strip().lower())
    if catalog_id is None:
        hint = closest_ids(model)
        suggestion = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise PlanInputError("model", f"unknown model {model!r}: give a catalog id or paste its config.json{suggestion}")
    return load_catalog_spec(catalog_id)


@lru_cache(maxsize=32)
def _spec_from_config_text(text: str) -> ModelSpec:
    from planner.introspect import spec_from_config  # torch only now, and only for a pasted config

    config = parse_config_text(text, "the pasted config.json")
    return spec_from_config(config, name=str(config.get("_name_or_path") or config.get("model_type") or "pasted config"))
