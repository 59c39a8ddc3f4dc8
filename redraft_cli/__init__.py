"""redraft: fast, lossless LLM inference with ReDrafter speculative decoding.

The core (drafter, beam drafting, tree attention, verification, the decoding
loop) is importable without the command-line layer::

    from redraft_cli import load_target, Drafter, DecodeConfig, Generator, shipped_drafter_dir

    target = load_target("smollm2-135m")
    drafter = Drafter.load(shipped_drafter_dir("smollm2-135m"))  # or Drafter.for_target(target) (untrained)
    gen = Generator(target, drafter)
    for step in gen.redraft(target.encode_chat("Name three colours."), drafter.decode_config()):
        print(target.tokenizer.decode(step.tokens), step.accepted)

    # Several prompts at once (Llama-family targets); each row equals its batch-1 output.
    out = gen.generate_batch([target.encode_chat(q) for q in ("Hi!", "What is 2 + 2?")], DecodeConfig())
    print([target.tokenizer.decode(t) for t in out.tokens])
"""

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): `import redraft_cli` stays light, so the `redraft`
# command can start (and answer Ctrl-C or --version) before torch and transformers load.
_EXPORTS = {
    "RedraftError": ".errors",
    "SamplingConfig": ".sampling",
    "Drafter": ".drafter",
    "DrafterConfig": ".drafter",
    "Target": ".target",
    "TargetSpec": ".loading",
    "load_target": ".loading",
    "DecodeConfig": ".decode",
    "Generation": ".decode",
    "BatchGeneration": ".decode",
    "Generator": ".decode",
    "StepStats": ".decode",
    "shipped_drafter_dir": ".shipped",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'redraft_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
