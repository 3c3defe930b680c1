"""The one error type every layer raises for bad input, with the field it concerns.

It stands on the ground floor, with the GPU catalog (the lowest package, whose lookups refuse
unknown names), so every layer above raises and catches the same type without importing upwards.
"""


class InputError(ValueError):
    """Input that cannot be planned. `field` names the option (or `model`), `reason` says why.

    The CLI prints it as one line and exits 2; the API answers 422 with `loc` and `msg`.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
