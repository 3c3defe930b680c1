"""The one error type the shells translate: bad input, with the field it concerns."""


class PlanInputError(ValueError):
    """Input that cannot be planned. `field` names the option (or `model`), `reason` says why.

    The CLI prints it as one line and exits 2; the API answers 422 with `loc` and `msg`.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
