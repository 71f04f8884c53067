"""User-facing errors: the CLI prints these as one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, paths, data): the message says what, where, how to fix."""

    exit_code = 2
