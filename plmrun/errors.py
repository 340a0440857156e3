"""The root of plmrun's typed errors: library code raises these, only the CLI turns them into exit codes.

Every subclass carries a one-line message that names the file (and line, key or step) and what to
do about it; `plmrun.cli.main` prints it as `error: <message>` and exits 2. A traceback means a bug.
"""


class PlmrunError(Exception):
    """A problem the user can fix; the message is one line naming the file or value and the fix."""


class ModelLoadError(PlmrunError, RuntimeError):
    """A path a model cannot be loaded from (missing, damaged, foreign or of another shape).

    `plmrun.model.loading` raises it (and is where callers import it); the model modules themselves raise
    ValueError, because export ships them without the rest of plmrun.
    """
