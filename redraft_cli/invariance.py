"""Which row counts make a CPU matmul's results independent of the rows beside them.

Greedy ReDrafter is exactly lossless only if a token's logits do not depend
on how many other tokens share the target's pass. On CPU a GEMM's kernel,
and with it the order in which each output is summed, is chosen by the
number of rows M and by where a row falls in the kernel's tiles. Measured on
this project's CPU (AMD EPYC, AVX-512 BF16, torch 2.13, MKL and oneDNN), a
row's bits for every M and every position p < M:

    bfloat16   the same for every M >= 2 (M = 1 is a GEMV, which sums the
               down projection's 1,536 inputs in another order; after
               rounding to 16 bits about one output in 6,000 shows it)
    float32    the same for M = 4, 8 and every M >= 12; other M differ
               (M = 1 is a GEMV; in M = 2..3, 5..7 and 9..11 the last
               rows fall in a remainder tile that sums in another order)

So a bfloat16 pass of 1 token runs as 2 rows, a float32 one as 4, a float32
pass of 9 tokens as 12, and then every token's logits are what a one-token
pass gives. Other CPUs and BLAS builds switch elsewhere, so `invariant_rows`
finds the good counts by trying (about a second per dtype and shape set,
then cached on disk) rather than assuming them, and the lean path
(`lean_llama.py`) pads its passes to them.
"""

from __future__ import annotations

import json
import platform
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from .files import atomic_write, cache_dir

# Every row count below LIMIT is tried; counts from LIMIT on must all be good (those in LARGE_ROWS
# are tried). Each count compares at least COMPARED outputs with the reference: in 16 bits a sum
# taken in another order rounds to the same bits most of the time, so one row cannot tell.
LIMIT = 24
LARGE_ROWS = (LIMIT, 31, 48, 67)
COMPARED = 100_000
# Columns probed at most: kernels tile rows the same whatever the column count (measured: the same
# good counts at 576 and 49,152 columns), and a large model's LM head would cost seconds and GBs.
MAX_COLUMNS = 8192


def linear_op(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The projections' matmul: (M, in) rows -> (M, out)."""
    return F.linear(rows, weight)


def scores_op(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The attention scores' matmul as `grouped_attention` calls it: (1, 1, M, d) @ (1, 1, d, S)."""
    return torch.matmul(rows[None, None], weight.t()[None, None])[0, 0]


def good_row_counts(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], in_features: int,
                    out_features: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu",
                    top: int | None = None) -> frozenset[int] | None:
    """The row counts M < LIMIT at which `op(W, X[:M])` and `op(W, X[-M:])` give every row the bits
    that the same row gets in `op(W, X)` (X: 67 random rows); None when a count in LARGE_ROWS
    disagrees (then no count is safe).

    top (a GPU, whose BLAS picks its kernel by the row count at every size): X has `top` rows,
    every M in 1..top is tried against it and no larger count is assumed good; `top` itself
    always is. out_features are not capped then (the kernel also depends on them).

    A row whose bits differ was summed in another order (another kernel, or another tile of the
    same one). Small counts are tried on several X, so that each compares COMPARED outputs.
    Worked example (float32 above): rows 1, 2, 3, 5, 6, 7, 9, 10, 11 disagree somewhere and
    4, 8, 12..23 never do, so this returns {4, 8, 12, 13, ..., 23}.
    """
    gen = torch.Generator().manual_seed(seed)
    out_features = min(out_features, MAX_COLUMNS) if top is None else out_features
    weight = torch.randn(out_features, in_features, generator=gen).div_(in_features ** 0.5).to(device, dtype)
    rows = LARGE_ROWS[-1] if top is None else top
    large = LARGE_ROWS if top is None else ()
    trials = -(-COMPARED // (2 * out_features))  # what M = 1 needs; M needs 1/M of them
    good = set(range(1, LIMIT if top is None else top))
    with torch.no_grad():
        for t in range(trials):
            x = torch.randn(rows, in_features, generator=gen).to(device, dtype)
            ref = op(weight, x)
            if t == 0 and top is not None and not torch.equal(op(weight, x), ref):
                return None  # not even deterministic
            for m in large if t == 0 else ():
                if not (torch.equal(op(weight, x[:m]), ref[:m]) and torch.equal(op(weight, x[-m:]), ref[-m:])):
                    return None
            for m in [m for m in good if t * m * 2 * out_features < COMPARED]:
                if not (torch.equal(op(weight, x[:m]), ref[:m]) and torch.equal(op(weight, x[-m:]), ref[-m:])):
                    good.discard(m)
    return frozenset(good) if top is None else frozenset(good | {top})


@lru_cache(maxsize=None)
def invariant_rows(dtype: torch.dtype, linear_shapes: tuple[tuple[int, int], ...], head_dim: int
                   ) -> frozenset[int] | None:
    """Row counts below LIMIT at which every CPU matmul of a decoder is batch-invariant in `dtype`
    (every count from LIMIT on is), or None when some matmul is not invariant at large counts.

    linear_shapes: the (in_features, out_features) of its projections and LM head; head_dim: the
    attention scores' inner size (their keys are probed at 512 positions). Kept in
    `cache_dir()/invariance.json` per torch version, CPU and thread count (the probe takes ~1 s).
    """
    key = "|".join(map(str, (torch.__version__, _cpu_name(), torch.get_num_threads(), dtype, linear_shapes,
                             head_dim, LIMIT, COMPARED, MAX_COLUMNS)))
    path = cache_dir() / "invariance.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key, "missing")
    if entry is None or (isinstance(entry, list) and all(type(m) is int and 1 <= m < LIMIT for m in entry)):
        return None if entry is None else frozenset(entry)
    good = _probe(dtype, linear_shapes, head_dim)
    known[key] = None if good is None else sorted(good)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in known.items()) + "\n}\n")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError:
        pass  # a read-only cache: probe again next time
    return good


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe(dtype: torch.dtype, linear_shapes: tuple[tuple[int, int], ...], head_dim: int) -> frozenset[int] | None:
    good = frozenset(range(1, LIMIT))
    for op, k, n in [(linear_op, k, n) for k, n in linear_shapes] + [(scores_op, head_dim, 512)]:
        counts = good_row_counts(op, k, n, dtype)
        if counts is None:
            return None
        good &= counts
    return good


def padded_rows(m: int, good: frozenset[int], limit: int = LIMIT) -> int:
    """The smallest good row count >= m; m itself from `limit` on (on the CPU every count from LIMIT
    on is good; on a GPU no count above the probed ones is known to be, `cuda_invariant_rows`)."""
    while m < limit and m not in good:
        m += 1
    return m


def pad_rows(t: torch.Tensor, dim: int, good: frozenset[int] | None, limit: int = LIMIT) -> torch.Tensor:
    """t with copies of its first slice along `dim` appended up to a good count (t itself when the
    count is good, or when `good` is None: not invariant). The copies compute the same bits as the
    first slice; callers drop them. Example: 1 row in float32 ({4, 8, 12, ...}) -> 4 rows, all row 0."""
    m = t.shape[dim]
    if good is None or padded_rows(m, good, limit) == m:
        return t
    shape = list(t.shape)
    shape[dim] = padded_rows(m, good, limit) - m
    return torch.cat([t, t.narrow(dim, 0, 1).expand(shape)], dim)


# On a GPU: the row counts probed (every decoding pass of up to this many tokens can be made invariant).
CUDA_TOP = 128


@lru_cache(maxsize=None)
def cuda_invariant_rows(dtype: torch.dtype, linear_shapes: tuple[tuple[int, int], ...], device: str = "cuda"
                        ) -> frozenset[int] | None:
    """Row counts in 1..CUDA_TOP at which every projection of a decoder gives each row the bits it gets
    among CUDA_TOP rows (CUDA_TOP always does; None when a product is not even the same twice),
    found by trying the real shapes on the GPU (cuBLAS
    picks its kernel, and its summation order, by M, N and K). Attention is not probed: on a GPU
    `grouped_attention` takes its scores in float64. Not kept on disk (the probe takes well under a
    second on a GPU; a driver or library update can change the answer)."""
    good = frozenset(range(1, CUDA_TOP + 1))
    for k, n in linear_shapes:
        counts = good_row_counts(linear_op, k, n, dtype, device=device, top=CUDA_TOP)
        if counts is None:
            return None
        good &= counts
    return good
