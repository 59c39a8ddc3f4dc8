"""Typed errors of the core. The CLI maps each to a one-line message and an exit code.

Exit codes: 2 for bad input (model, drafter, prompt, options, a context overflow), 1 for
anything else the core raises on purpose.
"""

from __future__ import annotations

from typing import Any


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



def python_scalar(value: Any) -> Any:
    """A numpy scalar (np.int64, np.float32, np.bool_, np.str_) as Python's own value, anything else as it
    is: what a caller's numpy values become in configs, so that they compare, print and save (JSON,
    YAML) as Python's do."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def check_field_types(obj: object) -> None:
    """BadInputError when a dataclass field annotated int, float, str or bool holds another type (a
    Python caller's "8" for 8); bools are not accepted as numbers. numpy's scalars become Python's
    values first, and a float field's whole number a float, so that results stay JSON-able."""
    import dataclasses
    import numbers

    kinds = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        want = kinds.get(name)
        if want is None:
            continue
        value = python_scalar(getattr(obj, f.name))
        if not isinstance(value, want) or (isinstance(value, bool) and name != "bool"):
            raise BadInputError(f"{type(obj).__name__}.{f.name} must be {name}, got {value!r}")
        if name == "int":
            value = int(value)  # (a subclass of int, or another Integral)
        elif name == "float":
            try:
                value = float(value)
            except OverflowError:  # a whole number of 400 digits
                raise BadInputError(f"{type(obj).__name__}.{f.name} must be a finite number, got a whole number "
                                    f"of {len(str(abs(value)))} digits") from None
        object.__setattr__(obj, f.name, value)
