"""Errors the CLI turns into one line on stderr and exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input or a refused request: the message names the option and the fix."""

    exit_code = 2
