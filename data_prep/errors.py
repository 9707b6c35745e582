"""The error catdog-prep reports as one line on stderr, exit status 2."""


class PrepError(Exception):
    """A fatal problem with the invocation; the message is one line saying what to do."""
