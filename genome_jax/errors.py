"""User-facing errors of the JAX engine: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (file, flag, config). The message names the culprit."""
