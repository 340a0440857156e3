"""The one exception type for bad data: its message is a single line the CLI prints as-is."""

from plmrun.errors import PlmrunError


class DataError(PlmrunError):
    """A data problem the user can fix; the message names the file (and line or record)."""
