"""The processes of one distillation: a single process, or several under `accelerate launch`.

`accelerate launch --multi_gpu --num_processes N -m redraft_cli distill ...` (or torchrun)
starts N copies of the same command. They split the work instead of repeating it:

- data: shard s of every answer set, and chunk c of every hidden-state cache, is made by
  process s % N (c % N); each writes its own files, and process 0 then records them all in
  the set's manifest, so the data is the same files a single process would have made;
- whatever exists once (the prompts the target writes, data seeded from the package) is
  made by process 0 while the others wait, then read by all;
- training is data parallel (accelerate), evaluation and the final files are process 0's.

On GPUs each process takes its own device, cuda:LOCAL_RANK. Waiting is a barrier on a
gloo group of its own with a long timeout: one process may write prompts for hours while
the others wait for it (the launch's own group keeps torch's timeouts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, TypeVar

import torch

from ..errors import BadInputError

T = TypeVar("T")
# How long a process may wait at a barrier for the others (data generation takes hours).
BARRIER_TIMEOUT = timedelta(hours=72)


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return max(_env_int("WORLD_SIZE", 1), 1)  # (0 reads as one process)


def launched_rank() -> int:
    """This process's rank in the launch (RANK; 0, the main process, without a launcher)."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise BadInputError(f"{name}={os.environ[name]!r} is not a process count or rank; unset it, or start several "
                            f"processes with accelerate launch -m redraft_cli distill ...")
    return value


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch: rank in 0..world-1 (0 is the main process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = field(default=None, compare=False, repr=False)  # the waiting group (several processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Iterable[T]) -> list[T]:
        """This process's items of a list that all processes split: every world-th, from rank."""
        return list(items)[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait until every process is here (nothing to wait for in a single process)."""
        if self.world > 1:
            torch.distributed.barrier(group=self.group)

    def main_only(self, fn: Callable[[], object]) -> None:
        """fn() in the main process while the others wait for it."""
        if self.is_main:
            fn()
        self.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() in the main process, then (once it is done) in the others: for what is made once and
        read by all, fn makes it where it is missing and reads it where it exists."""
        if not self.is_main:
            self.barrier()
        result = fn()
        if self.is_main:
            self.barrier()
        return result

    def device(self, device: str) -> str:
        """The --device this process uses: under a launch on GPUs, "auto" and "cuda" mean this
        process's own GPU (cuda:LOCAL_RANK), not GPU 0 for all."""
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device


def start_launch(device: str) -> Launch:
    """Join the launch's process group (several processes), or the single-process Launch().
    BadInputError when WORLD_SIZE says several processes but the launch is incomplete."""
    if launched_processes() <= 1:
        return Launch()
    from accelerate import PartialState

    cpu = device == "cpu" or (device in ("auto", "cuda") and not torch.cuda.is_available())
    try:
        state = PartialState(cpu=cpu)
        if state.num_processes <= 1 or not torch.distributed.is_initialized():  # (a state made before, alone)
            raise ValueError(f"WORLD_SIZE is {launched_processes()} but this process joined no process group")
        group = torch.distributed.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    except (ValueError, KeyError, RuntimeError) as exc:  # WORLD_SIZE without MASTER_ADDR, RANK, ...
        raise BadInputError(f"cannot start distributed training: {str(exc).splitlines()[0] if str(exc) else exc!r} "
                            f"(start several processes with accelerate launch -m redraft_cli distill ...)") from exc
    return Launch(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index, group=group)
