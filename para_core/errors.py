"""Errors raised by para_core. One class per kind of failure so callers (CLI, nodes) can
report a single clear line instead of a traceback."""


class ParaError(Exception):
    """Base class: anything that is the user's input, not a bug."""


class ParaFormatError(ParaError):
    """A file or tensor is not a valid PaRa / safetensors file. The message names file and key."""


class ParaShapeError(ParaError):
    """A PaRa basis does not fit the weight it is applied to."""


class ParaRankError(ParaError):
    """A basis is rank deficient or not finite."""
