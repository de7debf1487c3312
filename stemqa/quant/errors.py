"""Errors the quantization stage raises for bad settings or a machine that cannot run a method."""


class QuantError(ValueError):
    """A quantization request that cannot be carried out; the message says why and what to change."""


class GroupSizeError(QuantError):
    """The group size does not divide the input width of one or more linear layers (named in the message)."""


class UnsupportedMethodError(QuantError):
    """A method this machine or environment cannot run; the message names what is missing."""
