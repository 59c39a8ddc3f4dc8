"""Finding the row counts at which CPU matmuls are batch-invariant (invariance.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from redraft_cli import invariance
from redraft_cli.invariance import LIMIT, good_row_counts, invariant_rows, linear_op, pad_rows, padded_rows


def perturbed(rule):
    """A matmul that sums the rows `rule(M)` selects (a boolean per row) "in another order": +1e-3."""
    def op(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = F.linear(rows, weight)
        return out + 1e-3 * rule(rows.shape[0]).to(out.dtype).unsqueeze(1)
    return op


def gemv_rule(m: int) -> torch.Tensor:  # one row takes another kernel (bfloat16 here)
    return torch.full((m,), m == 1)


def tile_rule(m: int) -> torch.Tensor:  # below 12 rows, rows past the last multiple of 4 fall in a remainder tile
    return (torch.arange(m) >= m - m % 4) & (m < 12)


def every_tile_rule(m: int) -> torch.Tensor:  # ... at any row count
    return torch.arange(m) >= m - m % 4


def test_good_row_counts_finds_the_kernel_switches():
    assert good_row_counts(perturbed(gemv_rule), 16, 8, torch.float32) == frozenset(range(2, LIMIT))
    assert good_row_counts(perturbed(tile_rule), 16, 8, torch.float32) == frozenset({4, 8} | set(range(12, LIMIT)))
    assert good_row_counts(perturbed(every_tile_rule), 16, 8, torch.float32) is None  # 31 rows disagree
    assert good_row_counts(linear_op, 16, 8, torch.float64) is not None


def test_the_gpu_probe_tries_every_count_up_to_its_top():
    """On a GPU the kernel can change at any row count: every M up to `top` is compared with `top`
    rows, and nothing above `top` counts as good (padded_rows leaves such counts as they are)."""
    def middle_rule(m: int) -> torch.Tensor:  # 17..63 rows take another kernel
        return torch.full((m,), 16 < m < 64)

    def exact(op):  # on integer values every summation order gives the same bits: only the rule differs
        return lambda weight, rows: op(weight.round(), rows.round())

    good = good_row_counts(exact(perturbed(middle_rule)), 16, 512, torch.float32, top=96)
    assert good == frozenset(set(range(1, 17)) | set(range(64, 97)))
    assert [padded_rows(m, good, 97) for m in (1, 16, 17, 63, 64, 96, 97, 200)] == [1, 16, 64, 64, 64, 96, 97, 200]
    below_top = exact(perturbed(lambda m: torch.full((m,), m < 96)))
    assert good_row_counts(below_top, 16, 512, torch.float32, top=96) == {96}


def test_a_difference_in_one_row_of_many_trials_is_found():
    """In 16 bits most reordered sums round alike: the probe must compare enough outputs to see one."""
    calls = {"n": 0}

    def rare(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = F.linear(rows, weight)
        if rows.shape[0] == 1:
            calls["n"] += 1
            if calls["n"] == 40:  # only the 40th one-row matmul shows it
                out = out + 1e-3
        return out

    assert 1 not in good_row_counts(rare, 16, 8, torch.float32)


def test_padded_rows():
    good = frozenset({4, 8} | set(range(12, LIMIT)))
    assert [padded_rows(m, good) for m in (1, 3, 4, 5, 9, 12, 13, LIMIT, 100)] == [4, 4, 4, 8, 12, 12, 13, LIMIT, 100]
    assert padded_rows(1, frozenset(range(1, LIMIT))) == 1
    x = torch.arange(6.0).view(1, 3, 2)
    padded = pad_rows(x, 1, good)  # 3 rows along dim 1 -> 4, the new one a copy of row 0
    assert padded.shape == (1, 4, 2) and torch.equal(padded[:, :3], x) and torch.equal(padded[:, 3], x[:, 0])
    assert pad_rows(x, 1, None) is x and pad_rows(x, 1, frozenset(range(1, LIMIT))) is x


def test_the_answer_is_cached_on_disk_and_a_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path))
    path = tmp_path / "invariance.json"
    path.write_text("{not json")
    probe = invariant_rows.__wrapped__  # past the in-process cache
    good = probe(torch.float32, ((16, 8),), 8)
    saved = json.loads(path.read_text())
    assert list(saved.values()) == [None if good is None else sorted(good)]
    monkeypatch.setattr(invariance, "_probe", lambda *a: pytest.fail("probed again"))
    assert probe(torch.float32, ((16, 8),), 8) == good
    key = next(iter(saved))
    monkeypatch.setattr(invariance, "_probe", lambda *a: frozenset({5}))
    for garbage in ("garbage", [True, 4], [-5, 4], [1e30], [4, LIMIT]):  # hand edits are measured again
        path.write_text(json.dumps({key: garbage}))
        assert probe(torch.float32, ((16, 8),), 8) == frozenset({5}), garbage
