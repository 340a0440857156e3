"""The typed error of the eval commands (embed, probe, zeroshot, report)."""

from plmrun.errors import PlmrunError


class EvalError(PlmrunError):
    """A bad option or input of an eval command; one line naming the file or option and the fix."""
