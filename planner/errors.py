"""The one error type the shells translate: bad input, with the field it concerns
(gpu_catalog/errors.py defines it, below every layer that raises it)."""

from gpu_catalog.errors import InputError as PlanInputError

__all__ = ["PlanInputError"]
