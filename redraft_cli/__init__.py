"""redraft: fast, lossless LLM inference with ReDrafter speculative decoding.

The core (drafter, beam drafting, tree attention, verification, the decoding
loop) is importable without the command-line layer::

    from redraft_cli import load_target, Drafter, DecodeConfig, Generator

    target = load_target("smollm2-135m")
    drafter = Drafter.random_for(target, seed=0)
    gen = Generator(target, drafter)
    for step in gen.redraft(target.encode_chat("Name three colours."), DecodeConfig()):
        print(target.tokenizer.decode(step.tokens), step.accepted)

    # Several prompts at once (Llama-family targets); each row equals its batch-1 output.
    out = gen.generate_batch([target.encode_chat(q) for q in ("Hi!", "What is 2 + 2?")], DecodeConfig())
    print([target.tokenizer.decode(t) for t in out.tokens])
"""

__version__ = "0.1.0"

from .errors import RedraftError  # noqa: E402
from .sampling import SamplingConfig  # noqa: E402
from .drafter import Drafter, DrafterConfig  # noqa: E402
from .target import Target, TargetSpec, load_target  # noqa: E402
from .decode import BatchGeneration, DecodeConfig, Generation, Generator, StepStats  # noqa: E402

__all__ = [
    "RedraftError",
    "SamplingConfig",
    "Drafter",
    "DrafterConfig",
    "Target",
    "TargetSpec",
    "load_target",
    "DecodeConfig",
    "Generation",
    "BatchGeneration",
    "Generator",
    "StepStats",
]
