"""The one error hierarchy. The CLI turns any ToolchainError into a one-line message and exit 2.

Messages say what was wrong, what was expected, and how to fix it. Subclasses exist only where a
caller branches on them.
"""


class ToolchainError(Exception):
    """Bad input or a broken artifact: a user-facing problem, never a bug in csprt."""


class ScheduleError(ToolchainError):
    """A schedule that cannot be applied to this model (unknown preset, bad range or budget)."""


class CheckpointError(ToolchainError):
    """A checkpoint directory that is missing, corrupt, or does not match the model layout."""


class InputError(ToolchainError):
    """A request input that cannot be used: corrupt image, text too long, wrong shape."""


class ArtifactError(ToolchainError):
    """An exported artifact that cannot be used: incomplete, modified, from another schema or engine version."""


class ParityError(ToolchainError):
    """A backend disagrees with the reference beyond tolerance."""


def internal_error(message: str) -> AssertionError:
    """A broken invariant inside csprt (a bug), kept apart from user errors."""
    return AssertionError(f"csprt internal error (please report): {message}")
