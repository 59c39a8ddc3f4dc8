"""Option types shared by the commands (Annotated aliases), with defaults taken from the core."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..decode import DecodeConfig
from ..loading import DEFAULT_MODEL, TargetSpec
from .common import report_to_stdout

_D = DecodeConfig()
_T = TargetSpec()

Model = Annotated[str, typer.Option("--model", "-m", help="Hub id, local directory, .gguf file, or the alias smollm2-135m.")]
Dtype = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")]
Quantize = Annotated[str, typer.Option(help="none | 8bit | 4bit (bitsandbytes).")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="Spread the target's layers over the GPUs with accelerate, for a model too large for one: auto | balanced | balanced_low_0 | sequential.")]
DrafterOpt = Annotated[str, typer.Option("--drafter", "-d", help="Drafter directory, 'random' (untrained, seeded) or 'auto' (the one shipped for the model, else random).")]
BeamWidth = Annotated[Optional[int], typer.Option("--beam-width", "-w", help="Beams drafted per step (default: the drafter's recommendation).")]
BeamLength = Annotated[Optional[int], typer.Option("--beam-length", "-l", help="Tokens per beam, counting g0 (default: the drafter's recommendation).")]
Lookup = Annotated[Optional[int], typer.Option("--lookup", help="Extra beams copied from earlier context (the longest earlier match of its last tokens), beside the drafted ones; 0 = off (default: the drafter's recommendation).")]
LookupLength = Annotated[Optional[int], typer.Option("--lookup-length", help="Longest copy, counting g0: a match of m tokens copies 4 + 2m, up to this; may exceed the beam length (copies cost no drafting); 0 = the beam length (default: the drafter's recommendation).")]
DatastoreBeams = Annotated[Optional[int], typer.Option("--datastore", help="Extra beams copied from the drafter's datastore (the target's own answers in its training data), up to --lookup-length tokens long; 0 = off (default: the drafter's recommendation).")]
TreeNodes = Annotated[Optional[int], typer.Option("--nodes", help="Verify only the N most likely drafted tokens of the beam search (a node budget: the target's cost grows with the tree); 0 = every beam (default: the drafter's recommendation when the beam shape is the one it recommends, else 0).")]
Accept = Annotated[str, typer.Option(help="auto (greedy at temperature 0, else rejection) | greedy | rejection (lossless sampling) | typical (lossy, fast).")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Top-k filter (0 = off).")]
TopP = Annotated[float, typer.Option(help="Top-p (nucleus) filter (1.0 = off).")]
Seed = Annotated[int, typer.Option(help="Seed for sampling and for --drafter random.")]
MaxNewTokens = Annotated[int, typer.Option(help="Tokens to generate per answer (per prompt, or per turn with --turns).")]
Epsilon = Annotated[float, typer.Option(help="Typical acceptance: epsilon.")]
Delta = Annotated[float, typer.Option(help="Typical acceptance: delta.")]
PromptsFile = Annotated[Optional[Path], typer.Option("--prompts", help="JSONL (turns/prompt/text/messages), ShareGPT JSON, CSV/TSV with a prompt column, or text lines; - reads standard input; a prompt's own system turn goes with it; default: built-in chat prompts.")]
NumPrompts = Annotated[int, typer.Option(help="How many prompts to use.")]
Turns = Annotated[str, typer.Option("--turns", help="User turns answered per prompt: 1 (its first), N, or all. Each later turn is asked after the model's own answer to the one before, on every path, as MT-Bench does (the built-in prompts have up to 2; an MT-Bench question file's 'turns' work as they are).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Rows decoded at once on every path: continuous batching, a finished row's slot goes to the next prompt (HF generate: groups of B).")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", callback=report_to_stdout, help="Write the results as one JSON object to this file ('-': to standard output; the tables then go to standard error).")]
System = Annotated[Optional[str], typer.Option("--system", help="System turn before each conversation (\"\": an empty one, in place of the chat template's default; default: a prompt's own system turn from the prompt file, else the drafter's, if it was distilled with one, else the template's own).")]
ChatSystem = Annotated[Optional[str], typer.Option("--system", help="System turn before each conversation (\"\": an empty one, in place of the chat template's default; default: the drafter's, if it was distilled with one, else the template's own).")]
NoChatTemplate = Annotated[bool, typer.Option("--no-chat-template", help="Send prompts as raw text (models without a chat template).")]
ChatTemplate = Annotated[Optional[str], typer.Option("--chat-template", help="Render prompts with this chat template: a name (vicuna), a Jinja file or Jinja text (default: the tokenizer's own; without one, the template the drafter was distilled with).")]

DEFAULTS = {
    "model": DEFAULT_MODEL,
    "dtype": _T.dtype,
    "device": _T.device,
    "quantize": _T.quantize,
    "accept": _D.accept,
    "temperature": _D.sampling.temperature,
    "top_k": _D.sampling.top_k,
    "top_p": _D.sampling.top_p,
    "seed": _D.sampling.seed,
    "max_new_tokens": _D.max_new_tokens,
    "epsilon": _D.typical_epsilon,
    "delta": _D.typical_delta,
}
