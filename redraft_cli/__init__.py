"""redraft: fast, lossless LLM inference with ReDrafter speculative decoding.

The core (drafter, beam drafting, tree attention, verification, the decoding
loop) is importable without the command-line layer::

    from redraft_cli import load_target, Drafter, DecodeConfig, Generator

    target = load_target("smollm2-135m")
    drafter = Drafter.random_for(target, seed=0)
    gen = Generator(target, drafter)
    for step in gen.redraft(target.encode_chat("Name three colours."), DecodeConfig()):
        print(target.tokenizer.decode(step.tokens), step.accepted)
"""

__version__ = "0.1.0"

from .errors import RedraftError  # noqa: E402
from .sampling import SamplingConfig  # noqa: E402
from .drafter import Drafter, DrafterConfig  # noqa: E402
from .target import Target, TargetSpec, load_target  # noqa: E402
from .decode import DecodeConfig, Generator, StepStats  # noqa: E402

__all__ = [
    "RedraftError",
    "SamplingConfig",
    "Drafter",
    "DrafterConfig",
    "Target",
    "TargetSpec",
    "load_target",
    "DecodeConfig",
    "Generator",
    "StepStats",
]
