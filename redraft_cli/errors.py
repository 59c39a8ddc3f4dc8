"""Typed errors of the core. The CLI maps each to a one-line message and an exit code.

Exit codes: 2 for bad input (model, drafter, prompt, options), 3 for runtime
limits (context overflow), 1 for anything else the core raises on purpose.
"""


class RedraftError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 1


class BadInputError(RedraftError):
    """An option, file or value that cannot be used as given."""

    exit_code = 2


class ModelLoadError(BadInputError):
    """The target model cannot be found, fetched or read."""


class ChatTemplateError(BadInputError):
    """The tokenizer has no chat template but prompts must go through one."""


class DrafterLoadError(BadInputError):
    """A drafter checkpoint is missing, corrupt or of an unknown layout."""


class DrafterMismatchError(BadInputError):
    """A drafter was trained for a different target (hidden size, vocabulary)."""


class BeamShapeError(BadInputError):
    """Beam width/length that cannot be drafted or verified."""


class PromptError(BadInputError):
    """A prompt file that cannot be read, or holds no prompts."""


class ContextOverflowError(BadInputError):
    """The prompt does not fit in the target's context window."""

