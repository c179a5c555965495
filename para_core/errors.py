"""Errors raised by para_core. One class per kind of failure so callers (CLI, nodes) can
report a single clear line instead of a traceback.

A message is always one line: file names and tensor keys come from the user (a file may be called
"a\\nb.safetensors"), so control characters in the message are shown escaped (\\n, \\x1b, ...).
"""


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped, so it prints as exactly one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ParaError(Exception):
    """Base class: anything that is the user's input, not a bug."""

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (one_line(args[0]), *args[1:])
        super().__init__(*args)


class ParaFormatError(ParaError):
    """A file or tensor is not a valid PaRa / safetensors file. The message names file and key."""


class ParaShapeError(ParaError):
    """A PaRa basis does not fit the weight it is applied to."""


class ParaRankError(ParaError):
    """A basis is rank deficient or not finite."""
