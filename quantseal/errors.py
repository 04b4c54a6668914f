"""The errors quantseal reports to a user: one clear line on stderr and exit code 2.

Anything else that escapes is a bug and keeps its traceback."""


class QuantsealError(Exception):
    """Base class: a problem with the user's input, not with quantseal."""

    exit_code = 2


class BadInput(QuantsealError):
    """A missing, corrupt or malformed file or argument."""


class BudgetInfeasible(QuantsealError):
    """No plan fits the requested budget; the message names the smallest feasible one."""


class Unsupported(QuantsealError):
    """A model family, layer or format quantseal does not handle."""
