"""Start a drafter from a saved one (`drafter.init_from`): copy what fits, remap an `own` head's rows
to this run's draft vocabulary, and optionally train only what was not copied (`train.freeze_init`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..drafter import Drafter
from ..errors import BadInputError


def warm_start(drafter: Drafter, path: Path, copy: bool = True) -> dict[str, torch.Tensor | None]:
    """Start `drafter` from a saved drafter's weights; returns what was copied.

    Every tensor of the saved one must exist here with the same shape, except an
    `own` head's vocabulary projection when the draft vocabularies differ: its rows
    are matched by token id (a token new to the draft vocabulary keeps its fresh,
    small row; `drafter.draft_vocab` is kept). Tensors only `drafter` has (a context
    attention block added to a plain drafter) keep their initialisation (c = h).
    The result maps each copied tensor's name to None (copied whole) or to a
    (rows,) bool mask of its rows that are new. copy=False only computes it (resume).
    """
    source = Drafter.load(path)
    mine, theirs = drafter.state_dict(), source.state_dict()
    head = f"lm_head.{drafter.config.num_draft_layers}.weight"
    remap = drafter.config.head == "own" and source.config.head == "own" and head in theirs and (
        tuple(theirs[head].shape) != tuple(mine[head].shape) or "draft_vocab" not in theirs or "draft_vocab" not in mine
        or not torch.equal(theirs["draft_vocab"], mine["draft_vocab"].to(theirs["draft_vocab"].device)))
    # The draft vocabulary is this run's (from its data): an `own` head's rows move to it by token id; a
    # `tied` head has no rows of its own.
    skip = {head, "draft_vocab"} if remap else {"draft_vocab"}
    a, b = source.config, drafter.config
    differ = [f"{name} {x} vs {y}" for name, x, y in (("head", a.head, b.head), ("layers", a.num_draft_layers, b.num_draft_layers),
                                                      ("hidden size", a.hidden_size, b.hidden_size),
                                                      ("vocabulary", a.vocab_size, b.vocab_size)) if x != y]
    if a.context_window and not b.context_window:  # (adding a context block to a plain drafter is fine)
        differ.append(f"context window {a.context_window} vs none: set drafter.context_window (--context-window)")
    wrong = [k for k, v in theirs.items() if k not in skip and (k not in mine or tuple(mine[k].shape) != tuple(v.shape))]
    if differ or wrong:
        raise BadInputError(f"drafter.init_from {path} does not fit this recipe's drafter ("
                            f"{', '.join(differ) if differ else 'tensor ' + wrong[0]}); head, layers, hidden size and "
                            f"target vocabulary must match")
    copied: dict[str, torch.Tensor | None] = {k: None for k in theirs if k not in skip}
    with torch.no_grad():
        if copy:
            for k in copied:
                mine[k].copy_(theirs[k].to(mine[k].dtype))
        if remap:
            V = drafter.config.vocab_size
            full = lambda d: torch.arange(V) if d.draft_vocab is None else d.draft_vocab.cpu()
            row_of = torch.full((V,), -1, dtype=torch.long)
            row_of[full(source)] = torch.arange(full(source).numel())
            src_rows = row_of[full(drafter)]  # (V_d,) the source's row for each of our tokens, -1: new
            have = src_rows >= 0
            if copy:
                mine[head][have.to(mine[head].device)] = theirs[head][src_rows[have]].to(mine[head])
            copied[head] = ~have
    return copied


def freeze_copied(drafter: Drafter, copied: dict[str, torch.Tensor | None]) -> int:
    """Train only what a warm start did not copy: tensors copied whole stop learning, and a
    tensor with new rows learns those rows only (its gradient is masked). Returns the number
    of parameters left to train."""
    params = dict(drafter.named_parameters())
    trainable = 0
    for name, p in params.items():
        if name not in copied:
            trainable += p.numel()
        elif copied[name] is None:
            p.requires_grad_(False)
        else:
            keep = copied[name].to(device=p.device, dtype=p.dtype).view(-1, *([1] * (p.dim() - 1)))
            p.register_hook(lambda g, keep=keep: g * keep)
            trainable += int(copied[name].sum()) * (p.numel() // p.shape[0])
    return trainable
