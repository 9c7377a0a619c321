"""The one error type users see: a message that says what was wrong and what to do.

CLIs print it as a single line on stderr and exit with code 2; servers send it back as an error reply.
"""


class SeamError(Exception):
    """A failure caused by the user's input or environment, worded for the user."""

    exit_code = 2
