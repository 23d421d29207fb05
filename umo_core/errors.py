"""The one exception type users see: a message that names the bad input and what to do."""


class UMOError(Exception):
    """A problem with the user's input or setup (not a bug in the program).

    The message is meant to be shown as it is: one or two sentences that name the
    file, model or argument at fault and say how to fix it.
    """
