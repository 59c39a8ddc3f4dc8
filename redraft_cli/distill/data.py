"""Self-distillation data: the target's own answers to prompt conversations.

For every conversation (a list of user turns) the target answers turn by turn
with Hugging Face `generate` (batched, left-padded, greedy or sampled); the
training example is the final token sequence holding all turns with the
target's own answers, plus a mask of the positions the target generated.

Token exactness: later turns are built by appending the template's glue
(end of the assistant turn, next user turn, next generation prompt) as tokens
after the *exact* generated tokens, so the masked tokens are precisely what
the target produced in precisely the context it saw. If a chat template
rewrites earlier turns (so the rendered text is not an extension of the
previous prompt), the conversation is re-tokenised from text instead and only
its last answer is masked (counted as `retokenized` in the manifest).

On disk (`out_dir`):
- `shard-00000.safetensors`, ...: shard i holds conversations
  [i*shard_size, (i+1)*shard_size) minus the skipped ones, as
  `input_ids` int32 (T,), `loss_mask` uint8 (T,) (all examples concatenated),
  `offsets` int64 (n+1,) (example j is [offsets[j], offsets[j+1])) and
  `conv_index` int64 (n,).
- `manifest.json`: config, model, conversation count and fingerprint, the
  shards done, skipped count and totals; rewritten atomically after each shard.
Shards and manifest are written to a temporary file first, then os.replace'd,
so an interrupted run leaves only complete shards; rerunning resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..chat_templates import control_strings, encode_messages
from ..chat_templates import render as render_chat
from ..errors import BadInputError, ChatTemplateError
from ..files import atomic_write, remove_temporaries
from .launch import Launch

MANIFEST = "manifest.json"
PART = "part-{:05d}.json"  # a shard's record, written by one process of a launch
PART_GLOB = "part-*.json"
FORMAT_VERSION = 1
# Config fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("batch_size",)


@dataclass
class GenerationConfig:
    """How the self-distillation data is generated (defaults are the CLI's defaults)."""

    max_new_tokens: int = 256
    batch_size: int = 16
    temperature: float = 0.0  # 0 = greedy; else sampling with top_p
    top_p: float = 1.0
    seed: int = 0
    shard_size: int = 64  # conversations per shard file
    system: str | None = None
    max_prompt_tokens: int = 512  # longer prompts are skipped (counted in the manifest)
    chat_template: str | None = None  # sha256 of a template that replaces the tokenizer's own (None: its own)
    quantize: str | None = None  # the target's bitsandbytes quantization, 8bit | 4bit (None: unquantized)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "shard_size", "max_prompt_tokens"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise BadInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInputError(f"top-p must be in (0, 1], got {self.top_p}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that must match for a resumption (a chat template only when one replaced the tokenizer's
        own, a quantization only when there is one: data made before they were recorded keeps its key).
        The float dtype is not among them: float32 and bfloat16 answers of one model share their data
        (their greedy tokens differ at about 1% of positions; a drafter trained on either scores the same)."""
        return {k: v for k, v in asdict(self).items()
                if k not in RESUMABLE_FIELDS and not (k in ("chat_template", "quantize") and v is None)}


# -- chat glue -----------------------------------------------------------------


class _Chat:
    """Chat-template rendering and the token-exact multi-turn glue for one tokenizer."""

    def __init__(self, target: Any, system: str | None) -> None:
        self.tok = target.tokenizer
        self.name = target.name
        self.system = system
        self.eos_ids = sorted(int(e) for e in target.eos_ids)
        self.controls = control_strings(self.tok) if self.tok is not None else []
        if self.tok is None or not getattr(self.tok, "chat_template", None):
            raise ChatTemplateError(f"{target.name} has no chat template; self-distillation renders conversations "
                                    f"with it (--chat-template, or target.chat_template in the recipe: a name such as "
                                    f"vicuna, a Jinja file or text)")

    def render(self, messages: list[dict[str, str]]) -> str:
        """Template text ready for the assistant turn (the same text Target.encode_chat tokenises)."""
        return render_chat(self.tok, self._with_system(messages))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation ready for the assistant turn, as Target.encode_chat makes them:
        a control token's string inside a message ('<|im_end|>') stays text. BadInputError when the
        template changes such a message's text (chat_templates.encode_messages)."""
        return encode_messages(self.tok, self._with_system(messages))

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages after the run's system turn (data.system), unless they begin with their own."""
        if self.system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def next_prompt(self, prev_text: str, prev_ids: list[int], response: list[int],
                    messages: list[dict[str, str]]) -> tuple[str, list[int], bool]:
        """Prompt for the next turn.

        prev_text / prev_ids: the previous turn's prompt (text, tokens); response:
        the tokens generated for it (possibly ending with an EOS); messages: the
        whole history including that answer and the new user turn.
        Returns (text, ids, exact): ids == prev_ids + response + glue when exact,
        else the re-tokenised full text.
        """
        ends_eos = bool(response) and response[-1] in self.eos_ids
        text = self.render(messages)
        content = messages[-2]["content"]
        if text.startswith(prev_text) and text[len(prev_text):].startswith(content):
            tail = text[len(prev_text) + len(content):]
            if ends_eos:  # the generated EOS already closes the turn if the template closes it with the same token
                eos_text = self.tok.decode([response[-1]], skip_special_tokens=False)
                at = tail.find(eos_text) if eos_text else -1
                if at >= 0 and not tail[:at].strip():
                    tail = tail[at + len(eos_text):]
            return text, prev_ids + response + self._encode_tail(tail, messages[-1]["content"]), True
        return text, self.encode_messages(messages), False

    def _encode_tail(self, tail: str, content: str) -> list[int]:
        """Ids of the template text that closes the answer and opens the next turn, whose user message
        `content` stays text when it holds a control token's string (split where encode_messages splits)."""
        if not any(c in content for c in self.controls):
            return self.encode(tail)
        at = tail.rfind(content)
        if at < 0:
            raise BadInputError("the chat template changes a message that holds a control token's string")
        literal = self.tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return self.encode(tail[:at]) + list(literal) + self.encode(tail[at + len(content):])

    def answer_text(self, response: list[int]) -> str:
        """The assistant message text of a response (EOS dropped, whitespace trimmed like most templates do)."""
        if response and response[-1] in self.eos_ids:
            response = response[:-1]
        return self.tok.decode(response, skip_special_tokens=False).strip()


# -- batched generation -------------------------------------------------------------


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch: input_ids (B, P) long and attention_mask (B, P) long."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def trim_responses(new_tokens: torch.Tensor, eos_ids: list[int]) -> list[list[int]]:
    """Cut each generated row after its first EOS (kept) and drop the padding that follows.

    new_tokens: (B, N) the tokens generate() appended. Returns B lists of ids.
    """
    if new_tokens.numel() == 0:
        return [[] for _ in range(new_tokens.shape[0])]
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device))
    has = is_eos.any(dim=1)
    first = is_eos.int().argmax(dim=1)  # (B,) index of the first EOS (0 where none)
    lengths = torch.where(has, first + 1, torch.full_like(first, new_tokens.shape[1]))
    rows = new_tokens.cpu().tolist()
    return [row[:n] for row, n in zip(rows, lengths.tolist())]


def _hf_generation_config(target: Any, cfg: GenerationConfig, pad_id: int):
    from transformers import GenerationConfig as HFGenerationConfig

    kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
        eos_token_id=sorted(int(e) for e in target.eos_ids), pad_token_id=pad_id,
    )
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    return HFGenerationConfig(**kwargs)


@torch.no_grad()
def generate_batch(target: Any, prompts: list[list[int]], cfg: GenerationConfig, seed: int | None = None) -> list[list[int]]:
    """Answer a batch of token prompts with `target.model.generate`.

    prompts: B token lists (left-padded to (B, P) here). Returns B responses,
    each cut after its first EOS (the EOS kept), at most max_new_tokens long.
    """
    eos = sorted(int(e) for e in target.eos_ids)
    tok = target.tokenizer
    pad_id = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad_id is None:
        pad_id = eos[0] if eos else 0
    input_ids, attention_mask = _left_pad(prompts, int(pad_id), target.device)
    if seed is not None:
        torch.manual_seed(seed)
    out = target.model.generate(
        input_ids=input_ids, attention_mask=attention_mask,
        generation_config=_hf_generation_config(target, cfg, int(pad_id)),
    )
    new = out[:, input_ids.shape[1]:]  # (B, N <= max_new_tokens)
    return trim_responses(new, eos) if eos else [list(r) for r in new.cpu().tolist()]


# -- one shard ------------------------------------------------------------------


@dataclass
class _Conv:
    index: int
    turns: list[str]
    messages: list[dict[str, str]]
    prompt_text: str = ""
    prompt_ids: list[int] | None = None
    mask: list[bool] | None = None  # over prompt_ids (+ the last response once appended)
    seq: list[int] | None = None  # final sequence once finished
    turns_done: int = 0
    alive: bool = True
    system: str | None = None  # its own system turn (None: the run's, data.system)


def _seed_for(seed: int, shard: int, turn: int, batch: int) -> int:
    """A deterministic per-batch seed that does not depend on how many runs the data took."""
    return seed + shard * 1_000_003 + turn * 10_007 + batch


def _generate_shard(target: Any, chat: _Chat, items: list[tuple[int, list[str]]], cfg: GenerationConfig,
                    shard: int, on_batch: Callable[[int, int], None]) -> tuple[list[_Conv], dict[str, int]]:
    """Generate every turn of the shard's conversations (a prompts.Conversation begins with its own system
    turn); returns the finished ones and counters."""
    limit = min(cfg.max_prompt_tokens, int(getattr(target, "max_context", 1 << 30)) - cfg.max_new_tokens)
    convs = [_Conv(i, list(turns), [], system=getattr(turns, "system", None)) for i, turns in items]
    # (unrenderable, unrenderable_later: of the skipped and of the truncated, those with a message the chat
    # template would not render as its text)
    counts = dict(skipped=0, truncated=0, retokenized=0, responses=0, eos_responses=0, unrenderable=0,
                  unrenderable_later=0)
    for turn in range(max((len(c.turns) for c in convs), default=0)):
        active: list[_Conv] = []
        for c in convs:
            if not c.alive or turn >= len(c.turns):
                continue
            if turn == 0:
                own = [] if c.system is None else [{"role": "system", "content": c.system}]
                c.messages = [*own, {"role": "user", "content": c.turns[0]}]
                try:
                    c.prompt_text = chat.render(c.messages)
                    c.prompt_ids = chat.encode_messages(c.messages)
                except BadInputError:  # the template rewrites a message holding a control string: skip it
                    c.prompt_ids = []
                    counts["unrenderable"] += 1
                c.mask = [False] * len(c.prompt_ids)
            else:
                response = c.seq[len(c.prompt_ids):]
                c.messages = [*c.messages, {"role": "assistant", "content": chat.answer_text(response)},
                              {"role": "user", "content": c.turns[turn]}]
                try:
                    text, ids, exact = chat.next_prompt(c.prompt_text, c.prompt_ids, response, c.messages)
                except BadInputError:  # as for a first turn
                    ids = None
                    counts["unrenderable_later"] += 1
                if ids is None or len(ids) > limit:  # keep the turns done so far
                    c.alive = False
                    counts["truncated"] += 1
                    continue
                if not exact:
                    counts["retokenized"] += 1
                    c.mask = [False] * len(ids)
                else:
                    c.mask = c.mask + [False] * (len(ids) - len(c.mask))
                c.prompt_text, c.prompt_ids = text, ids
            if len(c.prompt_ids) > limit or not c.prompt_ids:
                c.alive = False
                counts["skipped"] += 1
                continue
            active.append(c)
        # Similar lengths share a batch; results stay keyed by the conversation object.
        active.sort(key=lambda c: len(c.prompt_ids))
        for b in range(0, len(active), cfg.batch_size):
            chunk = active[b:b + cfg.batch_size]
            seed = _seed_for(cfg.seed, shard, turn, b // cfg.batch_size)
            responses = generate_batch(target, [c.prompt_ids for c in chunk], cfg, seed=seed)
            finished = 0
            for c, r in zip(chunk, responses):
                c.seq = c.prompt_ids + r
                c.mask = c.mask + [True] * len(r)
                c.turns_done = turn + 1
                counts["responses"] += 1
                counts["eos_responses"] += int(bool(r) and r[-1] in chat.eos_ids)
                finished += int(turn + 1 == len(c.turns))
            on_batch(finished, sum(len(r) for r in responses))
    # Conversations cut short by a too-long later prompt are done too.
    return [c for c in convs if c.turns_done > 0], counts


# -- files ----------------------------------------------------------------------



def _write_json(path: Path, obj: dict) -> None:
    def write(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def _write_shard(path: Path, convs: list[_Conv]) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(c.seq) for c in convs], dtype=torch.int64)
    offsets = torch.zeros(len(convs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    tensors = {
        "input_ids": torch.tensor([t for c in convs for t in c.seq], dtype=torch.int32),
        "loss_mask": torch.tensor([m for c in convs for m in c.mask], dtype=torch.uint8),
        "offsets": offsets,
        "conv_index": torch.tensor([c.index for c in convs], dtype=torch.int64),
    }
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"format": f"redraft-distill-{FORMAT_VERSION}"}))


def conversations_sha256(conversations: list[list[str]]) -> str:
    """What identifies a list of conversations: their turns, and a conversation's own system turn where it has
    one (prompts.Conversation; lists without any hash as they did before those were kept)."""
    keyed = [c if getattr(c, "system", None) is None else {"system": c.system, "turns": list(c)} for c in conversations]
    return hashlib.sha256(json.dumps(keyed, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a data directory, or None when there is none yet."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise BadInputError(f"cannot read {path}: {exc}; delete {path.parent} to generate the data again") from exc
    problem = _manifest_problem(manifest)
    if problem:
        raise BadInputError(f"{path} is damaged ({problem}); delete {path.parent} to generate the data again")
    return manifest


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _shard_record_ok(shard: Any) -> bool:
    """Whether a shard's record (manifest entry or part file) has the fields loading reads, well typed."""
    return (isinstance(shard, dict) and _count(shard.get("index")) and _count(shard.get("conversations"))
            and _count(shard.get("skipped", 0))
            and (shard.get("file") is None or (isinstance(shard["file"], str) and "/" not in shard["file"])))


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a data manifest's structure, or None."""
    if not isinstance(m, dict):
        return f"a {type(m).__name__}, not a mapping"
    for key, ok in (("config", lambda v: isinstance(v, dict)), ("num_conversations", _count), ("num_shards", _count),
                    ("conversations_sha256", lambda v: isinstance(v, str)), ("shards", lambda v: isinstance(v, list))):
        if not ok(m.get(key)):
            return f"{key} is {m.get(key)!r}"
    seen = set()
    for shard in m["shards"]:
        if not _shard_record_ok(shard):
            return f"a shard record is {shard!r:.80}"
        if shard["index"] in seen or shard["index"] >= m["num_shards"]:
            return f"shard {shard['index']} is listed twice or past num_shards"
        seen.add(shard["index"])
    return None


def _totals(shards: list[dict]) -> dict[str, int]:
    keys = ("conversations", "tokens", "generated_tokens", "responses", "eos_responses", "skipped", "truncated", "retokenized",
            "unrenderable", "unrenderable_later")
    return {k: sum(int(s.get(k, 0)) for s in shards) for k in keys}


def _check_resume(manifest: dict, fresh: dict, out_dir: Path) -> None:
    if manifest.get("version") != FORMAT_VERSION:
        raise BadInputError(f"{out_dir} holds distillation data of another format version; use a new --out directory")
    if manifest.get("model") != fresh["model"]:
        raise BadInputError(
            f"{out_dir} holds data generated by {manifest.get('model')!r}, not {fresh['model']!r}; use a new --out directory"
        )
    old, new = manifest.get("config", {}), fresh["config"]
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        detail = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise BadInputError(f"{out_dir} was generated with different settings ({detail}); use a new --out directory")


def _extend_prompts(manifest: dict, fresh: dict, conversations: list[list[str]], out_dir: Path) -> None:
    """Accept the manifest for `conversations`: the same prompt set, or a longer one that starts with
    it (a grown prompt list: the shards wholly inside the old set keep their answers, the rest are
    to do). Anything else is refused."""
    count = int(manifest.get("num_conversations", -1))
    if count == fresh["num_conversations"] and manifest.get("conversations_sha256") == fresh["conversations_sha256"]:
        return
    if not 0 <= count < len(conversations) or conversations_sha256(conversations[:count]) != manifest.get("conversations_sha256"):
        raise BadInputError(f"{out_dir} was generated from a different prompt set; use a new --out directory")
    full = count // int(fresh["config"]["shard_size"])
    manifest["shards"] = [s for s in manifest["shards"] if int(s["index"]) < full]
    for key in ("num_conversations", "conversations_sha256", "num_shards"):
        manifest[key] = fresh[key]
    manifest["complete"] = False


# -- entry points -------------------------------------------------------------------


def generate_dataset(target: Any, conversations: list[list[str]], out_dir: str | Path, cfg: GenerationConfig,
                     progress: Callable[[int, int, int], None] | None = None,
                     stop_after_s: float | None = None, max_shards: int | None = None,
                     launch: Launch | None = None) -> dict:
    """Generate (or resume generating) self-distillation data into `out_dir`.

    conversations: each a list of user turns. Shards already listed in the
    manifest are skipped. progress(done_conversations, total_conversations,
    generated_tokens) is called after every batch and every shard, counting
    shards finished by earlier runs too (skipped conversations, and those cut
    short by a too-long later turn, count as done). stop_after_s: stop
    after the shard in progress once this much wall time has passed.
    max_shards: generate only the first N shards (a later call can extend it).
    A directory generated from the first conversations of this list is extended
    (a grown prompt list keeps the answers it has).
    launch: the processes of an `accelerate launch` (launch.py): each makes its share of the
    shards and records each in `part-SHARD.json`; the main process then moves those records
    into the manifest. Every process returns the same manifest.
    Returns the manifest (with `complete` and this run's `last_run` timing).
    """
    launch = launch or Launch()
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if launch.is_main:  # an interrupted run's
        remove_temporaries(out)
    launch.barrier()  # (before any process writes new ones)
    chat = _Chat(target, cfg.system)
    fresh = {
        "version": FORMAT_VERSION,
        "model": target.name,
        "config": cfg.fingerprint(),
        "batch_size": cfg.batch_size,
        "eos_ids": chat.eos_ids,
        "num_conversations": len(conversations),
        "conversations_sha256": conversations_sha256(conversations),
        "num_shards": (len(conversations) + cfg.shard_size - 1) // cfg.shard_size,
        "shards": [],
    }
    manifest = read_manifest(out)
    if manifest is None:
        manifest = fresh
    else:
        _check_resume(manifest, fresh, out)
        _extend_prompts(manifest, fresh, conversations, out)
        manifest["batch_size"] = cfg.batch_size
    absorbed = _absorb_parts(manifest, out)
    done_shards = {int(s["index"]) for s in manifest["shards"]}
    prior = _totals(manifest["shards"])
    state = {
        "done": sum(int(s["conversations"]) + int(s["skipped"]) for s in manifest["shards"]),
        "tokens": prior["generated_tokens"],
        "run_tokens": 0,
    }

    def on_batch(finished: int, new_tokens: int) -> None:
        state["done"] += finished
        state["tokens"] += new_tokens
        state["run_tokens"] += new_tokens
        if progress is not None:
            progress(state["done"], len(conversations), state["tokens"])

    generated_any = False
    for shard in launch.share(range(fresh["num_shards"])):
        if max_shards is not None and shard >= max_shards:
            break
        if shard in done_shards:
            continue
        lo, hi = shard * cfg.shard_size, min(len(conversations), (shard + 1) * cfg.shard_size)
        items = [(i, conversations[i]) for i in range(lo, hi)]
        convs, counts = _generate_shard(target, chat, items, cfg, shard, on_batch)
        generated_any = True
        name = f"shard-{shard:05d}.safetensors"
        if convs:
            _write_shard(out / name, convs)
        entry = {
            "index": shard,
            "file": name if convs else None,
            "conversations": len(convs),
            "tokens": sum(len(c.seq) for c in convs),
            "generated_tokens": sum(sum(c.mask) for c in convs),
            **counts,
        }
        if launch.world > 1:  # the main process records it in the manifest once all are done
            _write_json(out / PART.format(shard), {**entry, "of": manifest["conversations_sha256"]})
            recorded = manifest["shards"] + _parts(out, manifest)
        else:
            manifest["shards"].append(entry)
            manifest["shards"].sort(key=lambda s: s["index"])
            _finish_manifest(manifest, start, state["run_tokens"])
            _write_json(out / MANIFEST, manifest)
            recorded = manifest["shards"]
        # Skipped and truncated conversations of the shard are done as well.
        state["done"] = sum(int(s["conversations"]) + int(s["skipped"]) for s in recorded)
        if progress is not None:
            progress(state["done"], len(conversations), state["tokens"])
        if stop_after_s is not None and time.perf_counter() - start >= stop_after_s:
            break
    if launch.world > 1:
        launch.barrier()
        if launch.is_main:
            _absorb_parts(manifest, out)
            _finish_manifest(manifest, start, state["run_tokens"])
            _write_json(out / MANIFEST, manifest)
            for part in out.glob(PART_GLOB):
                part.unlink(missing_ok=True)
        launch.barrier()
        return read_manifest(out) or manifest
    _finish_manifest(manifest, start, state["run_tokens"])
    if generated_any or absorbed or not (out / MANIFEST).exists():
        _write_json(out / MANIFEST, manifest)
    for part in out.glob(PART_GLOB):  # taken into the manifest, or stale
        part.unlink(missing_ok=True)
    return manifest


def _parts(out: Path, manifest: dict) -> list[dict]:
    """The shard records of `part-*.json` files (written by the processes of a launch) for this
    manifest's prompt set, whose shard it does not hold yet and whose file is there. A damaged
    record, or one of another prompt set, is ignored (its shard is made again)."""
    recorded = {int(s["index"]) for s in manifest["shards"]}
    found = []
    for path in sorted(out.glob(PART_GLOB)):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not _shard_record_ok(entry):
            continue
        index = entry["index"]
        if (entry.pop("of", None) == manifest["conversations_sha256"] and index not in recorded
                and 0 <= index < int(manifest["num_shards"])
                and (entry.get("file") is None or (out / str(entry["file"])).is_file())):
            found.append(entry)
            recorded.add(index)
    return found


def _absorb_parts(manifest: dict, out: Path) -> bool:
    """Move the part records of shards of this manifest's set into it (a launch that was
    stopped before its main process recorded them keeps those shards); whether there were any."""
    new = _parts(out, manifest)
    if new:
        manifest["shards"] = sorted(manifest["shards"] + new, key=lambda s: int(s["index"]))
    return bool(new)


def _finish_manifest(manifest: dict, start: float, run_tokens: int) -> None:
    manifest["totals"] = _totals(manifest["shards"])
    manifest["skipped"] = manifest["totals"]["skipped"]
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    seconds = time.perf_counter() - start
    manifest["last_run"] = {
        "seconds": round(seconds, 3),
        "generated_tokens": run_tokens,
        "tokens_per_s": round(run_tokens / seconds, 2) if seconds > 0 else 0.0,
    }


def _shard_tensors(out: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out / name
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise BadInputError(f"cannot read distillation shard {path}: {exc}") from exc


def drop_damaged_shards(out_dir: str | Path) -> list[str]:
    """The shards the manifest lists whose file is missing or does not read (truncated by a crash, or
    damaged since): taken out of the manifest (no longer complete) and deleted, so that generating the
    set again makes just those, as before (each shard's answers depend only on its conversations and
    the settings). Returns their file names. Only while no other process writes in `out_dir`."""
    from safetensors import SafetensorError, safe_open

    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        return []
    damaged = []
    for shard in manifest["shards"]:
        if not shard.get("file"):
            continue
        try:
            with safe_open(str(out / shard["file"]), "pt") as f:  # (reads the header: a truncated file fails)
                whole = {"input_ids", "loss_mask", "offsets", "conv_index"} <= set(f.keys())
        except (OSError, SafetensorError):
            whole = False
        if not whole:
            damaged.append(shard)
    if damaged:
        manifest["shards"] = [s for s in manifest["shards"] if s not in damaged]
        manifest["totals"] = _totals(manifest["shards"])
        manifest["skipped"] = manifest["totals"]["skipped"]
        manifest["complete"] = False
        _write_json(out / MANIFEST, manifest)
        for shard in damaged:
            (out / shard["file"]).unlink(missing_ok=True)
    return [s["file"] for s in damaged]


def load_dataset(out_dir: str | Path) -> list[dict]:
    """All examples of the completed shards listed in the manifest, in conversation order.

    Each example: input_ids LongTensor (T,), loss_mask BoolTensor (T,) (True where
    the target generated the token), conv_index int.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise BadInputError(f"{out} holds no distillation data ({MANIFEST} is missing)")
    examples: list[dict] = []
    for shard in manifest["shards"]:
        if not shard.get("file"):
            continue
        t = _shard_tensors(out, shard["file"])
        try:
            ids, mask, offsets = t["input_ids"].long(), t["loss_mask"].bool(), t["offsets"].tolist()
            convs = t["conv_index"].tolist()
            if (ids.dim() != 1 or mask.shape != ids.shape or len(offsets) != len(convs) + 1 or offsets[0] != 0
                    or offsets[-1] != ids.numel() or any(b <= a for a, b in zip(offsets, offsets[1:]))
                    or (ids.numel() and int(ids.min()) < 0)):
                raise ValueError("its tensors do not fit together")
        except (KeyError, ValueError, RuntimeError) as exc:
            raise BadInputError(f"distillation shard {out / shard['file']} is damaged ({exc}); delete the folder {out} "
                                f"to generate the data again") from exc
        for j, conv in enumerate(convs):
            a, b = offsets[j], offsets[j + 1]
            examples.append({"input_ids": ids[a:b], "loss_mask": mask[a:b], "conv_index": int(conv)})
    return examples


def repeated_4gram_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Bool (T,): True at t >= 3 where input_ids[t-3:t+1] already occurred ending at some s < t."""
    n = input_ids.shape[0]
    out = torch.zeros(n, dtype=torch.bool)
    if n < 4:
        return out
    grams = input_ids.long().unfold(0, 4, 1)  # (T-3, 4): gram g ends at position g+3
    _, inverse = torch.unique(grams, dim=0, return_inverse=True)
    pos = torch.arange(grams.shape[0])
    first = torch.full((int(inverse.max()) + 1,), grams.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    out[3:] = first[inverse] < pos
    return out


def dataset_stats(out_dir: str | Path) -> dict:
    """Summary of a data directory: conversations, tokens, generated tokens, the
    fraction of responses that end in EOS, and the fraction of generated
    positions whose 4-gram repeats an earlier 4-gram of the same example."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    examples = load_dataset(out)
    tokens = sum(int(e["input_ids"].numel()) for e in examples)
    generated = sum(int(e["loss_mask"].sum()) for e in examples)
    scored = repeated = 0
    for e in examples:
        gen = e["loss_mask"].clone()
        gen[:3] = False  # no full 4-gram ends there
        scored += int(gen.sum())
        repeated += int((repeated_4gram_positions(e["input_ids"]) & gen).sum())
    totals = _totals(manifest["shards"])
    return {
        "conversations": len(examples),
        "conversations_total": manifest["num_conversations"],
        "skipped": totals["skipped"],
        "complete": bool(manifest.get("complete")),
        "tokens": tokens,
        "generated_tokens": generated,
        "responses": totals["responses"],
        "eos_fraction": totals["eos_responses"] / totals["responses"] if totals["responses"] else 0.0,
        "repeat_4gram_fraction": repeated / scored if scored else 0.0,
    }
