"""Drafter training (DESIGN section 6): frozen target, teacher-forced recurrent drafter.

For a sequence x_0..x_{T-1} with the target's post-norm hidden states h_t,
drafter position t sees h_t and the inputs x_{t+1}..x_{t+K} (x_{t+1} is g0)
and its step k (k = 0..K-1) predicts x_{t+2+k}. Worked example, K = 2:

    t = 5: h_5, inputs [x_6, x_7] -> step 0 predicts x_7, step 1 predicts x_8

A position's label at step k counts when x_{t+2+k} is a token the target
generated (the data's loss_mask). Each step samples up to
`positions_per_sequence` eligible positions per sequence (seeded by the
global step, so a resumed run draws exactly the same positions), runs the
target once over the batch (no grad) and the drafter on the sampled positions.

Loss: the sum over steps k of the mean cross-entropy against the target's
token, plus kl_weight x KL(target || drafter) at the same positions. Sampled
answers (recipe data.sampled_answers) are teacher-forced on their sampled
tokens but labelled with the target's greedy token at each position (stored
beside their hidden states): exactly what greedy verification will check.

Runs through accelerate: `accelerate launch -m redraft_cli distill ...`
trains data-parallel with no code change (each process takes every
num_processes-th batch of one seeded order; gradients are averaged by DDP).
Checkpoints (drafter, optimiser, scheduler, trainer state) are written
atomically to out/checkpoint every `save_every` steps, on Ctrl-C and at the
end; `resume=True` continues from the exact step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..drafter import Drafter
from ..errors import BadInputError, DrafterLoadError
from ..target import Target
from .recipe import TrainSection

CHECKPOINT = "checkpoint"
EventFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainState:
    step: int = 0
    best_step: int = -1
    best_agreement: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    recent_losses: list[float] = field(default_factory=list)  # the last 50 micro-batch losses (means in the reports)
    total_steps: int = 0  # the schedule's length (0: a checkpoint from before it was recorded)
    held_out_key: str = ""  # what identifies the held-out conversations (pipeline: their sha256; "": not recorded)
    data_key: str = ""  # what identifies the training examples (training_data_key; "": not recorded)


# -- batches ---------------------------------------------------------------------


def collate(examples: list[dict], max_len: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Right-pad examples. Returns input_ids (B, T), attention (B, T) bool, loss_mask (B, T) bool,
    hidden (B, T, H) when every example carries cached hidden states (else None) and
    greedy (B, T), the target's greedy token per position, when any example carries it (sampled
    answers; an example without it, greedy data, is its own greedy tokens), else None."""
    T = min(max_len, max(int(e["input_ids"].numel()) for e in examples))
    B = len(examples)
    ids = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    mask = torch.zeros(B, T, dtype=torch.bool)
    cached = all("hidden" in e for e in examples)
    hidden = torch.zeros(B, T, examples[0]["hidden"].shape[-1], dtype=examples[0]["hidden"].dtype) if cached else None
    greedy = torch.zeros(B, T, dtype=torch.long) if any("greedy" in e for e in examples) else None
    for i, e in enumerate(examples):
        n = min(T, int(e["input_ids"].numel()))
        ids[i, :n] = e["input_ids"][:n]
        attn[i, :n] = True
        mask[i, :n] = e["loss_mask"][:n]
        if hidden is not None:
            hidden[i, :n] = e["hidden"][:n]
        if greedy is not None:
            greedy[i, :n] = e.get("greedy", e["input_ids"])[:n]
    return ids, attn, mask, hidden, greedy


def drafter_positions(ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor, K: int, per_seq: int | None,
                      generator: torch.Generator | None, greedy: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose drafter positions and build their inputs and labels.

    ids, attn, loss_mask: (B, T); greedy: optional (B, T), the target's greedy
    token at each position given the tokens before it (sampled data: the
    inputs are the sampled tokens, the labels what greedy decoding would check
    them against). Returns
      pos    (B, P) int64 positions t (P <= per_seq; `valid` marks real ones),
      inputs (B, P, K) tokens x_{t+1..t+K} (g0 first),
      labels (B, P, K) tokens x_{t+2..t+K+1} (greedy[t+2..t+K+1] when given),
      label_mask (B, P, K) bool: label is a generated token inside the sequence.
    """
    B, T = ids.shape
    pad = K + 2
    ids_p = F.pad(ids, (0, pad))
    lm_p = F.pad(loss_mask & attn, (0, pad))
    # Eligible t: the first label x_{t+2} is a generated token.
    eligible = lm_p[:, 2 : T + 2]  # (B, T)
    # Only eligible positions are worth computing: P is capped by the most any row has.
    most = int(eligible.sum(dim=1).max()) if T else 0
    P = max(1, min(most, T if per_seq is None else per_seq))
    score = torch.rand(B, T, generator=generator) if generator is not None else torch.arange(T, 0, -1).float().expand(B, T)
    score = torch.where(eligible, score, torch.full_like(score, -1.0))
    top, pos = torch.topk(score, P, dim=1)  # (B, P)
    valid = top >= 0
    offs = torch.arange(K)
    in_idx = pos.unsqueeze(-1) + 1 + offs  # (B, P, K)
    lab_idx = in_idx + 1
    inputs = ids_p.gather(1, in_idx.view(B, -1)).view(B, P, K)
    label_src = ids_p if greedy is None else F.pad(greedy, (0, pad))
    labels = label_src.gather(1, lab_idx.view(B, -1)).view(B, P, K)
    label_mask = lm_p.gather(1, lab_idx.view(B, -1)).view(B, P, K) & valid.unsqueeze(-1)
    # Stop at the first non-generated label (teacher forcing must not cross into a new user turn).
    label_mask = torch.cumprod(label_mask.to(torch.int8), dim=-1).bool()
    return pos, inputs, labels, label_mask


def _vocab_index(drafter: Drafter, vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """Full vocabulary id -> draft-vocabulary index (-1 where absent), or None for the full vocabulary."""
    if drafter.draft_vocab is None:
        return None
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    index[drafter.draft_vocab.to(device)] = torch.arange(drafter.draft_vocab.numel(), device=device)
    return index


def batch_loss(target: Target, drafter: Any, raw: Drafter, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor,
               K: int, per_seq: int | None, generator: torch.Generator | None, kl_weight: float = 0.0,
               compare_target_argmax: bool = False, hidden: torch.Tensor | None = None,
               greedy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch: target forward (no grad; skipped when cached `hidden` (B, T, H) is given),
    drafter on sampled positions; labels from `greedy` (B, T) when given (drafter_positions).

    Returns (loss, stats) where stats holds per-step `correct` (K,), `count` (K,)
    and `loss_sum` (K,) for agreement and loss reporting. `drafter` may be the
    accelerate-wrapped module; `raw` is the unwrapped Drafter.
    """
    device = target.device
    pos, inputs, labels, label_mask = drafter_positions(ids, attn, loss_mask, K, per_seq, generator, greedy)
    ids, attn = ids.to(device), attn.to(device)
    pos, inputs, labels, label_mask = pos.to(device), inputs.to(device), labels.to(device), label_mask.to(device)
    with torch.no_grad():
        if hidden is None:
            hidden = target.base(input_ids=ids, attention_mask=attn.long(), use_cache=False).last_hidden_state  # (B, T, H)
        else:
            hidden = hidden.to(device=device, dtype=target.compute_dtype)
        H = hidden.shape[-1]
        h = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, H))  # (B, P, H)
        # Sampled answers without cached greedy labels (-1) take the target's argmax there.
        unlabelled = (labels < 0) & label_mask
        relabel = bool(unlabelled.any())
        need_target = kl_weight > 0 or compare_target_argmax or relabel
        if need_target:
            # The target's distribution for x_{t+2+k} comes from its hidden state at t+1+k.
            tpos = (pos.unsqueeze(-1) + 1 + torch.arange(K, device=device)).clamp_max(hidden.shape[1] - 1)
            th = hidden.gather(1, tpos.view(tpos.shape[0], -1, 1).expand(-1, -1, H)).view(*tpos.shape, H)
        if relabel:
            labels = torch.where(unlabelled, target.logits(th).argmax(-1), labels)
        labels = labels.clamp_min(0)  # -1 left only where label_mask is False
    if raw.context is None:
        logits = drafter(h.to(raw.rnn_w.weight.dtype), inputs).float()  # (B, P, K, V_d)
    else:  # context attention reads the whole sequences
        logits = drafter(h, inputs, hidden=hidden, ids=ids, pos=pos).float()
    vocab_index = _vocab_index(raw, target.vocab_size, device)
    target_ids = labels if vocab_index is None else vocab_index[labels]
    labelled = label_mask  # every position with a label: agreement counts an out-of-vocabulary label as a miss
    label_mask = label_mask & (target_ids >= 0)  # the loss can only use labels inside the draft vocabulary
    if compare_target_argmax:
        with torch.no_grad():
            t_logits = target.logits(th)  # (B, P, K, V)
            t_argmax = t_logits.argmax(-1)
        ref = t_argmax if vocab_index is None else vocab_index[t_argmax]
    else:
        ref = target_ids
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids.clamp_min(0).reshape(-1), reduction="none")
    ce = ce.view(label_mask.shape) * label_mask
    count = label_mask.sum(dim=(0, 1))  # (K,)
    loss_sum = ce.sum(dim=(0, 1))  # (K,)
    loss = (loss_sum / count.clamp_min(1)).sum()
    if kl_weight > 0:
        with torch.no_grad():
            # The target's distribution over the draft vocabulary (renormalised there): its LM head
            # rows for those tokens only, a (V_d x H) matmul instead of the full vocabulary.
            head = target.lm_head_weight if raw.draft_vocab is None else target.lm_head_weight.index_select(
                0, raw.draft_vocab.to(device))
            t_logits = F.linear(th.to(head.dtype), head).float()  # (B, P, K, V_d)
            if target.softcap:
                t_logits = torch.tanh(t_logits / target.softcap) * target.softcap
            t_logp = torch.log_softmax(t_logits, dim=-1)
        kl = F.kl_div(torch.log_softmax(logits, -1), t_logp, log_target=True, reduction="none").sum(-1) * label_mask
        loss = loss + kl_weight * (kl.sum(dim=(0, 1)) / count.clamp_min(1)).sum()
    correct = ((logits.argmax(-1) == ref) & label_mask).sum(dim=(0, 1))
    return loss, {"correct": correct.detach(), "count": count.detach(), "labelled": labelled.sum(dim=(0, 1)).detach(),
                  "loss_sum": loss_sum.detach()}


# -- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(target: Target, drafter: Drafter, examples: list[dict], K: int, batch_size: int, max_len: int,
             positions_per_sequence: int | None = 128, compare_target_argmax: bool = False) -> dict[str, Any]:
    """Per-step top-1 agreement and loss on held-out examples.

    Agreement is against the data's tokens (the target's own greedy tokens for
    greedy self-distillation) or, with compare_target_argmax (sampled data),
    against the target's argmax; a label outside the draft vocabulary counts
    as a miss (the drafter cannot propose it), while the loss skips it.
    Positions: up to positions_per_sequence per
    sequence, drawn with a fixed seed so every evaluation sees the same ones
    (None: all positions).
    """
    was_training = drafter.training
    drafter.eval()
    correct = torch.zeros(K)
    count = torch.zeros(K)
    labelled = torch.zeros(K)
    loss_sum = torch.zeros(K)
    for i in range(0, len(examples), batch_size):
        ids, attn, mask, hidden, greedy = collate(examples[i : i + batch_size], max_len)
        gen = torch.Generator().manual_seed(12_345 + i) if positions_per_sequence else None
        _, s = batch_loss(target, drafter, drafter, ids, attn, mask, K, positions_per_sequence, gen,
                          compare_target_argmax=compare_target_argmax, hidden=hidden, greedy=greedy)
        correct += s["correct"].cpu()
        count += s["count"].cpu()
        labelled += s["labelled"].cpu()
        loss_sum += s["loss_sum"].cpu()
    drafter.train(was_training)
    agreement = (correct / labelled.clamp_min(1)).tolist()  # a label outside the draft vocabulary is a miss
    return {
        "agreement": [round(a, 4) for a in agreement],
        "mean_agreement": round(sum(agreement) / K, 4),
        "loss": round(float((loss_sum / count.clamp_min(1)).sum()), 4),
        "positions": int(labelled[0]),
        # Expected accepted drafts per step for one greedy beam: sum over k of P(steps 0..k all right),
        # estimated with the per-step agreements as if independent (a rough guide, bench measures it).
        "est_tokens_per_step": round(1 + sum(math.prod(agreement[: k + 1]) for k in range(K)), 3),
    }


# -- checkpoints ------------------------------------------------------------------------


def save_checkpoint(out: Path, drafter: Drafter, optimizer: Any, scheduler: Any, state: TrainState) -> None:
    """Write out/checkpoint atomically: a temp dir, then rename over the old one."""
    final = out / CHECKPOINT
    tmp = out / f".{CHECKPOINT}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    drafter.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    old = out / f".{CHECKPOINT}.old{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


# What a checkpoint must share with the run that resumes it (the drafter's shape, what it learns, and from whom).
RESUME_FIELDS = ("hidden_size", "vocab_size", "num_draft_layers", "head", "draft_vocab_size", "context_window",
                 "predict_tokens", "target_model")


def check_resumable(out: Path, drafter: Drafter) -> Drafter:
    """out's checkpointed drafter; BadInputError when it was written for another drafter shape or
    target. Call it before writing anything in out (the recipe.yaml of a refused resume stays the
    old one)."""
    ckpt = out / CHECKPOINT
    try:
        loaded = Drafter.load(ckpt, map_location="cpu")
    except (OSError, ValueError, KeyError, RuntimeError, DrafterLoadError) as exc:
        raise BadInputError(f"cannot resume from {ckpt}: {' '.join(str(exc).split())[:300]}; delete {ckpt} to start "
                            f"training again (the data is kept), or use another --out") from exc
    differ = [f"{k} {getattr(loaded.config, k)!r} (this run: {getattr(drafter.config, k)!r})" for k in RESUME_FIELDS
              if getattr(loaded.config, k) != getattr(drafter.config, k)]
    if differ:
        raise BadInputError(f"cannot resume from {ckpt}: its drafter has {', '.join(differ)}; resume with the "
                            "settings of the run that wrote it, or use another --out")
    return loaded


def training_data_key(examples: list[dict]) -> str:
    """What identifies a training set (its examples' tokens and loss masks, in order): a checkpoint keeps
    it, and a resume on other data says so."""
    digest = hashlib.sha256()
    for e in examples:
        for name in ("input_ids", "loss_mask"):
            digest.update(e[name].to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def check_same_held_out_key(out: Path, before: str, now: str) -> None:
    """BadInputError when the checkpoint in `out` was trained with other held-out conversations than this
    run's (keys as train_drafter's held_out_key; "" on either side: unknown, nothing to compare)."""
    if before and now and before != now:
        raise BadInputError(f"cannot resume {out}: its run held out other conversations than this one (data.source "
                            f"edited, reordered or replaced, or another data.held_out), so some of them were trained "
                            f"on; resume with the prompts and data.held_out it was trained with, or use another --out")


def checkpoint_held_out_key(out: Path) -> str:
    """The held_out_key recorded in out's checkpoint ("" when there is none, or it cannot be read)."""
    try:
        key = json.loads((out / CHECKPOINT / "trainer_state.json").read_text()).get("held_out_key", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return key if isinstance(key, str) else ""


def recover_checkpoint(out: Path, clean: bool = False) -> None:
    """A run stopped between save_checkpoint's two renames left no checkpoint/, only .checkpoint.oldPID
    (the one before) and, if the new one was complete, .checkpoint.tmpPID: put back the latest complete
    one. clean=True (this process holds --out, so no other run writes these): the newer complete
    .checkpoint.tmpPID counts too, and what is left of older saves is removed."""
    final = out / CHECKPOINT
    if not final.exists():
        found = [(_saved_step(p), p.stat().st_mtime, p) for p in out.glob(f".{CHECKPOINT}.old*")]
        if clean:
            found += [(_saved_step(p), p.stat().st_mtime, p) for p in out.glob(f".{CHECKPOINT}.tmp*")]
        found = [f for f in found if f[0] >= 0]
        if found:
            try:
                os.replace(max(found)[2], final)
            except OSError:  # another process of a launch put it back first
                pass
    if clean and final.exists():
        for stale in [*out.glob(f".{CHECKPOINT}.old*"), *out.glob(f".{CHECKPOINT}.tmp*")]:
            shutil.rmtree(stale, ignore_errors=True)


def _saved_step(folder: Path) -> int:
    """The step of a complete checkpoint folder (trainer_state.json, written last, reads), else -1."""
    try:
        step = json.loads((folder / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


def take_hyperparameters(optimizer: Any, scheduler: Any, cfg: TrainSection) -> str:
    """After a resume, this run's peak learning rate and weight decay (a checkpoint's optimizer and scheduler
    states restore the ones it was trained with, so `--resume --lr` after a diverged run changed nothing).
    The schedule itself follows this run's steps already. Returns what changed ('' for nothing)."""
    decay = optimizer.param_groups[0]  # (the other group never decays)
    changed = [f"{name} {new:g}" for name, old, new in (("lr", scheduler.base_lrs[0], cfg.lr),
                                                        ("weight_decay", decay["weight_decay"], cfg.weight_decay))
               if old != new]
    decay["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor(scheduler.last_epoch)
    return " and ".join(changed)


def load_checkpoint(out: Path, drafter: Drafter, optimizer: Any, scheduler: Any) -> TrainState:
    """Restore out/checkpoint into `drafter`, `optimizer` and `scheduler`; its TrainState. Damaged
    files are a one-line BadInputError naming the file and saying what to do."""
    ckpt = out / CHECKPOINT
    loaded = check_resumable(out, drafter)
    damaged = f"; its files are damaged: delete {ckpt} to start again, or use another --out"
    try:
        opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInputError(f"cannot resume from {ckpt}: optimizer.pt is missing" + damaged) from None
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):  # (torch's texts run for lines)
        raise BadInputError(f"cannot resume from {ckpt}: optimizer.pt cannot be read (cut short, or not the file "
                            f"a checkpoint writes)" + damaged) from None
    try:
        drafter.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise BadInputError(f"cannot resume from {ckpt}: optimizer.pt does not hold this drafter's optimizer and "
                            f"schedule ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})" + damaged) from None
    try:
        state = trainer_state(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot resume from {ckpt}: trainer_state.json cannot be read "
                            f"({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})" + damaged) from None
    except (ValueError, RecursionError) as exc:
        why = str(exc) if isinstance(exc, _BadState) else "it is not JSON"
        raise BadInputError(f"cannot resume from {ckpt}: trainer_state.json: {why}" + damaged) from None
    return state


class _BadState(ValueError):
    """What is wrong with a trainer_state.json (its message names the field)."""


def trainer_state(data: Any) -> TrainState:
    """The TrainState of a checkpoint's trainer_state.json, every field checked: `_BadState` (a ValueError)
    naming the first wrong one. step, best_step, best_agreement, history and seconds are required;
    recent_losses, total_steps, held_out_key and data_key came later (older checkpoints lack them)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not isinstance(data, dict):
        raise _BadState(f"it holds {type(data).__name__}, not an object")
    known = {f.name for f in fields(TrainState)}
    missing = [k for k in ("step", "best_step", "best_agreement", "history", "seconds") if k not in data]
    if missing:
        raise _BadState(f"{missing[0]!r} is missing")
    unknown = sorted(set(data) - known)
    if unknown:
        raise _BadState(f"{unknown[0]!r} is not a field of it")
    checks = {"step": integer(data["step"], 0), "best_step": integer(data["best_step"], -1),
              "best_agreement": number(data["best_agreement"]), "seconds": number(data["seconds"]) and data["seconds"] >= 0,
              "history": isinstance(data["history"], list) and all(
                  isinstance(r, dict) and integer(r.get("step"), 0) for r in data["history"]),
              "recent_losses": isinstance(data.get("recent_losses", []), list) and all(
                  number(v) for v in data.get("recent_losses", [])),
              "total_steps": integer(data.get("total_steps", 0), 0),
              "held_out_key": isinstance(data.get("held_out_key", ""), str),
              "data_key": isinstance(data.get("data_key", ""), str)}
    wrong = next((k for k, ok in checks.items() if not ok), None)
    if wrong == "history" and isinstance(data["history"], list):
        raise _BadState("'history' holds an entry that is not an evaluation row with its step")
    if wrong:
        raise _BadState(f"{wrong!r} is {json.dumps(data[wrong])[:60]}, which no run writes")
    state = TrainState(**data)
    if state.total_steps and state.step > state.total_steps:
        raise _BadState(f"'step' is {state.step}, past the {state.total_steps} steps of the run that wrote it")
    if state.best_step > state.step:
        raise _BadState(f"'best_step' is {state.best_step}, past its 'step' {state.step}")
    return state


# -- the loop ------------------------------------------------------------------------------


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def train_drafter(target: Target, drafter: Drafter, train_set: list[dict], eval_set: list[dict], cfg: TrainSection,
                  out: Path, predict_tokens: int, resume: bool = False, on_event: EventFn | None = None,
                  accelerator: Any = None, compare_target_argmax: bool = False, held_out_key: str = "") -> TrainState:
    """Train `drafter` (attached to `target`) and keep the best checkpoint by held-out agreement.

    Writes out/best (the best drafter, interoperable format), out/checkpoint
    (for --resume) and returns the final TrainState (with history). held_out_key names the held-out
    conversations (kept in the checkpoint): a resume whose key differs is refused, since it would
    train on conversations it is evaluated on. Dropout draws from a generator seeded per micro-batch,
    so a resumed run equals an uninterrupted one with dropout too.
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    if not train_set:
        raise BadInputError("no training examples: generate data first or check --data")
    K = predict_tokens
    try:
        acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=target.device.type == "cpu")
    except ValueError as exc:  # WORLD_SIZE > 1 without the rest of a launch (MASTER_ADDR, ...)
        raise BadInputError(f"cannot start distributed training: {str(exc).splitlines()[0]} (start several "
                            f"processes with accelerate launch -m redraft_cli distill ...)") from exc
    world, rank = acc.num_processes, acc.process_index
    batches_per_epoch = max(1, math.ceil(len(train_set) / cfg.batch_size))
    per_process = max(1, batches_per_epoch // world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_process / cfg.grad_accum))
    drafter.dropout = cfg.dropout
    decay = [p for n, p in drafter.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in drafter.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    out.mkdir(parents=True, exist_ok=True)
    data_key = training_data_key(train_set)
    state = TrainState(total_steps=total, held_out_key=held_out_key, data_key=data_key)
    emit = on_event or (lambda e: None)
    if (out / CHECKPOINT).exists():
        if not resume:
            raise BadInputError(f"{out} already holds a training checkpoint; pass --resume to continue it or use another --out")
        state = load_checkpoint(out, drafter, optimizer, scheduler)
        check_same_held_out_key(out, state.held_out_key, held_out_key)
        state.held_out_key = held_out_key or state.held_out_key
        if state.data_key and state.data_key != data_key and state.step < total:
            emit({"event": "note", "text": f"the training data differs from the data the checkpoint's {state.step} steps "
                                           f"trained on (other or edited prompts, more data, other data settings): the "
                                           f"rest of the run trains on this data, so the result is neither run's "
                                           f"uninterrupted one"})
        state.data_key = data_key
        changed = take_hyperparameters(optimizer, scheduler, cfg)
        if changed:
            emit({"event": "note", "text": f"resuming with {changed} (the checkpoint's run used other values)"})
        if state.total_steps and state.total_steps != total and state.step < total:
            emit({"event": "note", "text": f"the learning-rate schedule now runs to step {total} (the checkpoint's "
                                           f"run: {state.total_steps}); the steps left follow it, so the result is not "
                                           f"that of an uninterrupted {total}-step run"})
        state.total_steps = total
    if state.best_step >= 0 and not _loads(out / "best"):  # deleted or damaged since: the next evaluation writes it
        emit({"event": "note", "text": f"{out / 'best'} is missing or damaged; the next evaluation writes it again"})
        state.best_step, state.best_agreement = -1, -1.0
    model, optimizer, scheduler = acc.prepare(drafter, optimizer, scheduler)
    model.train()
    if state.step >= total:
        emit({"event": "note", "text": f"the checkpoint is at step {state.step}, at or past the {total} steps asked "
                                       "for: nothing left to train; the final files are written from it (raise "
                                       "--max-steps or --epochs to train on)"})
    emit({"event": "start", "total_steps": total, "step": state.step, "examples": len(train_set), "processes": world})
    start = time.perf_counter() - state.seconds
    try:
        if 0 < state.step and _evaluates_at(state.step, cfg, total) and \
                not any(row["step"] == state.step for row in state.history):
            # Stopped during this step's evaluation: make it, as the uninterrupted run did.
            _evaluate_and_keep_best(acc, target, drafter, eval_set, K, cfg, out, state, emit, compare_target_argmax)
        while state.step < total:
            step = state.step
            optimizer.zero_grad(set_to_none=True)
            stats_sum: dict[str, torch.Tensor] = {}
            losses: list[float] = []
            for micro in range(cfg.grad_accum):
                # Global micro-batch number -> (epoch, batch in epoch) for this process.
                g = step * cfg.grad_accum + micro
                epoch, j = divmod(g, per_process)
                order = epoch_order(len(train_set), epoch, cfg.seed)
                b = j * world + rank
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size] or order[: cfg.batch_size]
                ids, attn, mask, hidden, greedy = collate([train_set[i] for i in idx], cfg.max_seq_len)
                gen = torch.Generator().manual_seed(cfg.seed * 7_919 + g * 31 + rank)
                if cfg.dropout > 0:  # (dropout draws from the global generator: seeded per micro-batch, as gen)
                    torch.manual_seed(cfg.seed * 7_919 + g * 31 + rank + 1)
                with acc.autocast():
                    loss, stats = batch_loss(target, model, drafter, ids, attn, mask, K, cfg.positions_per_sequence, gen,
                                             kl_weight=cfg.kl_weight, hidden=hidden, greedy=greedy)
                if _blown(float(loss.detach()), K):
                    raise BadInputError(_diverged(f"at step {step + 1}: the loss is {float(loss):.4g}", cfg, out))
                acc.backward(loss / cfg.grad_accum)
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0) + v.float().cpu()
                losses.append(float(loss.detach()))
                if cfg.grad_accum > 1:  # (a step of many micro-batches shows its progress)
                    emit({"event": "micro", "step": step, "micro": micro + 1, "grad_accum": cfg.grad_accum,
                          "total_steps": total})
            acc.clip_grad_norm_(model.parameters(), 1.0)
            with _ctrl_c_after():  # the weights and the step count change together (a checkpoint of both)
                optimizer.step()
                scheduler.step()
                state.step += 1
                state.recent_losses = (state.recent_losses + losses)[-50:]
            state.seconds = time.perf_counter() - start
            train_acc = (stats_sum["correct"] / stats_sum["labelled"].clamp_min(1)).tolist()
            recent = state.recent_losses[-20:]
            emit({"event": "step", "step": state.step, "total_steps": total, "loss": sum(recent) / len(recent),
                  "lr": scheduler.get_last_lr()[0], "train_agreement": train_acc, "epoch": (step * cfg.grad_accum) / per_process})
            if _evaluates_at(state.step, cfg, total):
                _evaluate_and_keep_best(acc, target, drafter, eval_set, K, cfg, out, state, emit, compare_target_argmax)
            if acc.is_main_process and (state.step % cfg.save_every == 0 or state.step == total):
                if not all(bool(torch.isfinite(p).all()) for p in drafter.parameters()):
                    raise BadInputError(_diverged(f"by step {state.step}: the drafter's weights are not finite", cfg, out))
                if not _evaluates_at(state.step, cfg, total):  # (an evaluation checked these weights already)
                    _check_updated(target, drafter, (ids, attn, mask, hidden, greedy), K, cfg, state.step, out)
                save_checkpoint(out, drafter, optimizer, scheduler, state)
            acc.wait_for_everyone()
    except KeyboardInterrupt:
        if acc.is_main_process:
            state.seconds = time.perf_counter() - start
            with _ctrl_c_after(swallow=True):  # (a second Ctrl-C must not cut the checkpoint the message promises)
                save_checkpoint(out, drafter, optimizer, scheduler, state)
        emit({"event": "interrupted", "step": state.step})  # (a Ctrl-C held over a step ends after its event)
        raise
    finally:
        drafter.dropout = 0.0
    if state.best_step < 0:  # nothing evaluated since best/ was lost (a resume at the last step)
        _evaluate_and_keep_best(acc, target, drafter, eval_set, K, cfg, out, state, emit, compare_target_argmax)
    acc.wait_for_everyone()
    emit({"event": "done", "step": state.step, "seconds": state.seconds, "best_step": state.best_step,
          "best_agreement": state.best_agreement})
    return state


@torch.no_grad()
def _check_updated(target: Target, drafter: Drafter, batch: tuple, K: int, cfg: TrainSection, step: int,
                   out: Path) -> None:
    """Before a checkpoint keeps the weights of `step`: the loss of the step's last micro-batch `batch`
    (ids, attn, mask, hidden, greedy), again with the updated weights, is a model's (`_blown`). Weights
    blown up by the update (a learning rate or weight decay far too high) stay finite, but their loss does
    not, and a checkpoint of them would make `--resume` go on from them. Unwrapped drafter (one process), no dropout, its own generator:
    the training's random streams are untouched."""
    ids, attn, mask, hidden, greedy = batch
    dropout, drafter.dropout = drafter.dropout, 0.0
    try:
        loss, _ = batch_loss(target, drafter, drafter, ids, attn, mask, K, cfg.positions_per_sequence,
                             torch.Generator().manual_seed(0), kl_weight=cfg.kl_weight, hidden=hidden, greedy=greedy)
    finally:
        drafter.dropout = dropout
    if _blown(float(loss), K):
        raise BadInputError(_diverged(f"by step {step}: the loss with its updated weights is {float(loss):.4g}", cfg, out))


def _blown(loss: float, K: int) -> bool:
    """Whether a loss (summed over K draft positions) is no model's: not finite, or above 1,000 nats a
    position (an untrained drafter's is about ln V, 11 for 49,152 tokens)."""
    return not math.isfinite(loss) or loss > 1000.0 * K


def _diverged(what: str, cfg: TrainSection, out: Path) -> str:
    """The message for a run whose loss or weights blew up (`what`: when, and which)."""
    decay = f" or train.weight_decay (now {cfg.weight_decay:g})" if cfg.lr * cfg.weight_decay >= 0.5 else ""
    kept = ("--resume continues from the last checkpoint, saved before it diverged" if (out / CHECKPOINT).is_dir()
            else "no checkpoint was saved before it")
    return f"training diverged {what}; lower the learning rate (--lr, now {cfg.lr:g}){decay} and run again ({kept})"


@contextmanager
def _ctrl_c_after(swallow: bool = False) -> Any:
    """Ctrl-C (or a SIGTERM / SIGHUP that a handler turns into KeyboardInterrupt, as `redraft distill`'s
    does) inside the block stops the run at its end instead. swallow=True: the run is stopping already
    (the checkpoint a first Ctrl-C saves): a second one inside the block is ignored."""
    deferred: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, *(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))):
            handler = signal.getsignal(sig)
            if handler is signal.default_int_handler or (sig != signal.SIGINT and callable(handler)):
                deferred[sig] = handler
    if not deferred:
        yield
        return
    caught: list[int] = []
    for sig in deferred:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in deferred.items():
            signal.signal(sig, handler)
    if caught and not swallow:
        deferred[caught[0]](caught[0], None)  # (raises KeyboardInterrupt, after what its handler records)
        raise KeyboardInterrupt


def _loads(path: Path) -> bool:
    """Whether a saved drafter is there and loads."""
    try:
        Drafter.load(path)
        return True
    except Exception:  # missing, truncated, garbled: any reason means write it again
        return False


def _evaluates_at(step: int, cfg: TrainSection, total: int) -> bool:
    """Whether training evaluates (and may keep best/) after `step`: every eval_every steps and at the end."""
    return step % cfg.eval_every == 0 or step == total


def _evaluate_and_keep_best(acc, target, drafter, eval_set, K, cfg, out, state, emit, compare) -> None:
    if not acc.is_main_process:
        return
    losses = state.recent_losses
    row: dict[str, Any] = {"step": state.step, "train_loss": round(sum(losses) / max(len(losses), 1), 4),
                           "seconds": round(state.seconds, 1)}
    if eval_set:
        row.update(evaluate(target, drafter, eval_set, K, cfg.batch_size, cfg.max_seq_len,
                            compare_target_argmax=compare))
        if _blown(row["loss"], K):  # (weights blown up but finite: neither best/ nor a checkpoint keeps them)
            raise BadInputError(_diverged(f"by step {state.step}: the held-out loss is {row['loss']:.4g}", cfg, out))
        score = row["mean_agreement"]
    else:
        score = -row["train_loss"]
    if state.best_step < 0 or score > state.best_agreement:  # (without held-out data the score is -loss < -1)
        drafter.save(out / "best")  # before the state says so: a run stopped here evaluates again on --resume
        state.best_agreement, state.best_step = score, state.step
    state.history.append(row)
    emit({"event": "eval", **row, "best_step": state.best_step})
