"""The one exception for bad input: the CLIs print its message as one line and exit 2."""


class InputError(Exception):
    """A problem with something the user gave us (a scenario, a profile, a trace row).

    The message names the file, the field and the problem, and is shown without a traceback.
    """
