"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config value). The message is one line that names
    the offending file or key and says how to fix it; the CLI prints it without a traceback."""
