"""The one exception for bad input: the CLIs print its message as one line and exit 2."""


class InputError(Exception):
    """A problem with something the user gave us (a scenario, a profile, a trace row).

    The message names the file, the field and the problem, and is shown without a traceback.
    """


def first_words(e: BaseException) -> str:
    """What a library's exception says, in one line: the first line of its innermost cause
    (huggingface_hub wraps transformers' words; plotly spreads its own over several lines)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def parse_words(e: ValueError) -> str:
    """What a parser's ValueError says, up to the advice Python adds after ';' (a number past 4,300
    digits: "...; use sys.set_int_max_str_digits() to increase the limit")."""
    return str(e).split(";")[0]
