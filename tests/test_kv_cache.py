"""After ReDrafter steps the KV cache equals plain decoding's for the same tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from redraft_cli import DecodeConfig, Generator
from redraft_cli.kv_cache import commit_path
from redraft_cli.static_cache import StaticKVCache

from test_decode_greedy import OracleProposer


def _layers(cache):
    """(keys, values) per layer, (1, kv_heads, committed length, head_dim), for either cache kind."""
    if isinstance(cache, StaticKVCache):
        n = int(cache.lengths[0])
        return [(cache.keys[i, :, :, :n], cache.values[i, :, :, :n]) for i in range(cache.keys.shape[0])]
    return [(layer.keys, layer.values) for layer in cache.hf.layers]


@pytest.fixture(params=["lean", "generic"])
def path_target(request, tiny_target):
    """The tiny Llama through the lean path (StaticKVCache) and through the generic HF path."""
    lean = tiny_target.lean
    if request.param == "generic":
        tiny_target.lean = None
    yield tiny_target
    tiny_target.lean = lean


def test_cache_matches_plain_decoding(path_target):
    tiny_target = path_target
    cfg = DecodeConfig(max_new_tokens=17, beam_width=4, beam_length=4, stop_on_eos=False)
    for i, prompt in enumerate(random_prompts(6, tiny_target.vocab_size, seed=11)):
        fast = Generator(tiny_target, proposer=OracleProposer(tiny_target, seed=i, oracle_beam=i))
        out = fast.generate(prompt, cfg, "redraft")
        assert max(s.accepted for s in out.decode_steps) > 0, "some drafts must be accepted"
        slow = Generator(tiny_target)
        plain = slow.generate(prompt, cfg, "plain")
        assert out.tokens == plain.tokens
        # Both caches hold prompt + all tokens but the last (the last is emitted, not yet fed).
        expected_len = len(prompt) + len(out.tokens) - 1
        for (k1, v1), (k2, v2) in zip(_layers(fast.cache), _layers(slow.cache)):
            assert k1.shape[2] == expected_len == k2.shape[2]
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, layers):
        self.layers = layers


def test_commit_path_worked_example():
    # prefix 4, nodes n0..n5, keep [0, 4, 5] -> [c0 c1 c2 c3 n0 n4 n5]
    seq = torch.arange(10.0).view(1, 1, 10, 1)
    cache = _Cache([_Layer(seq.clone(), -seq.clone())])
    commit_path(cache, 4, torch.tensor([0, 4, 5]))
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert cache.layers[0].values.flatten().tolist() == [0, -1, -2, -3, -4, -8, -9]
    # A contiguous path just truncates.
    cache = _Cache([_Layer(seq.clone(), seq.clone())])
    commit_path(cache, 4, torch.tensor([0, 1]))
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_static_commit_worked_example():
    # The same example on a StaticKVCache with two rows of different lengths.
    cache = StaticKVCache(1, 2, 1, 12, 1, torch.float32, torch.device("cpu"))
    cache.keys[0, :, 0, :, 0] = torch.arange(12.0)
    cache.values[0, :, 0, :, 0] = -torch.arange(12.0)
    cache.lengths = torch.tensor([4, 2])
    cache.commit(torch.tensor([[0, 4, 5], [0, 1, 2]]), torch.tensor([3, 2]))
    assert cache.lengths.tolist() == [7, 4]
    assert cache.keys[0, 0, 0, :7, 0].tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert cache.values[0, 0, 0, :7, 0].tolist() == [0, -1, -2, -3, -4, -8, -9]
    assert cache.keys[0, 1, 0, :4, 0].tolist() == [0, 1, 2, 3]


def _filled(batch: int, seed: int, lengths: list[int]) -> StaticKVCache:
    cache = StaticKVCache(2, batch, 2, 8, 4, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    cache._keys.copy_(torch.randn(cache._keys.shape, generator=g))
    cache._values.copy_(torch.randn(cache._values.shape, generator=g))
    cache.lengths = torch.tensor(lengths)
    return cache


def test_rows_leave_and_join_in_place_worked_example():
    """reserved 4, rows [a b c d]: keep [0, 2, 3] -> [a c d | free]; append [e] -> [a c d e]; no reallocation."""
    cache = _filled(4, 0, [3, 4, 5, 6])
    keys, values, ptr = cache.keys.clone(), cache.values.clone(), cache._keys.data_ptr()
    cache.keep(torch.tensor([0, 2, 3]))
    assert torch.equal(cache.keys, keys[:, [0, 2, 3]]) and torch.equal(cache.values, values[:, [0, 2, 3]])
    assert cache.lengths.tolist() == [3, 5, 6] and cache.reserved == 4
    e = _filled(1, 1, [2])
    cache.append(e)
    assert cache._keys.data_ptr() == ptr and cache.reserved == 4
    assert torch.equal(cache.keys, torch.cat([keys[:, [0, 2, 3]], e.keys], 1))
    assert torch.equal(cache.values, torch.cat([values[:, [0, 2, 3]], e.values], 1))
    assert cache.lengths.tolist() == [3, 5, 6, 2]


def test_rows_may_leave_in_any_order_and_joins_past_the_reserve_grow_the_buffers():
    cache = _filled(3, 2, [1, 2, 3])
    keys = cache.keys.clone()
    cache.keep(torch.tensor([2, 0]))  # overlapping moves: place 0 <- row 2, place 1 <- row 0
    assert torch.equal(cache.keys, keys[:, [2, 0]]) and cache.lengths.tolist() == [3, 1]
    more = _filled(3, 3, [4, 5, 6])
    cache.append(more)
    assert cache.reserved == 5 and cache.lengths.tolist() == [3, 1, 4, 5, 6]
    assert torch.equal(cache.keys, torch.cat([keys[:, [2, 0]], more.keys], 1))
    with pytest.raises(ValueError, match="cannot append"):
        cache.append(StaticKVCache(2, 1, 2, 9, 4, torch.float32, torch.device("cpu")))


def test_write_puts_each_rows_tokens_at_its_own_slots_and_nothing_else():
    """Rows of lengths [3, 5] write n = 2 tokens at slots [3, 4] and [5, 6] of every KV head; the
    rest of the buffer is untouched, also after a row leaves (the batch size changes)."""
    cache = _filled(2, 4, [3, 5])
    before = cache.keys.clone()
    k = torch.arange(2 * 2 * 2 * 4, dtype=torch.float32).view(2, 2, 2, 4)  # (B, kv_heads, n, head_dim)
    cache.write(1, k, -k, cache.slots(2))
    expected = before.clone()
    expected[1, 0, :, 3:5] = k[0]
    expected[1, 1, :, 5:7] = k[1]
    assert torch.equal(cache.keys, expected)
    assert torch.equal(cache.values[1, 1, :, 5:7], -k[1])
    cache.keep(torch.tensor([1]))
    cache.write(0, k[:1], k[:1], cache.slots(2))
    assert torch.equal(cache.keys[0, 0, :, 5:7], k[0]) and torch.equal(cache.keys[1, 0], expected[1, 1])
