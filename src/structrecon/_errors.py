"""Errors that the command line reports as one line, without a traceback."""


class StructreconError(Exception):
    """Bad input or an impossible request; the message is meant for the user."""
