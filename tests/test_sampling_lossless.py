"""Statistical losslessness: ReDrafter with accept="rejection" samples exactly like plain sampling.

Set-up: a tiny random one-layer Llama with an 8-token vocabulary (so distributions
are spread and the joint law of a few tokens can be enumerated exactly) and a
proposer test double that drafts the target's own most likely continuations (so
drafts are accepted often and the rejection rule does real work at every step).

For each sampling configuration we draw a few thousand short generations, one
sampling seed each, from `Generator.plain` and from `Generator.redraft`
(rejection), and run

* chi-square goodness-of-fit tests of each sample against the *exact* law of
  the generated tokens, enumerated from the target's probabilities (after the
  same temperature / top-p the sampler uses): the joint law of all tokens
  (rare cells pooled) and each token's marginal;
* a chi-square two-sample homogeneity test between plain and ReDrafter.

All must pass at alpha = 1e-3. Power: two deliberately wrong acceptance rules
plugged into the same loop must be rejected by the same tests, by a wide margin,
with far fewer samples: the reference implementation's p/q ratio rule applied
to deterministic drafts, and the subtler "one draw per beam cell instead of per
tree node".

Everything is seeded (model init, prompt, one sampling seed per generation) and
runs on one CPU thread, so the outcome is deterministic.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from conftest import tiny_llama
from redraft_cli.beam_search import DraftBeams
from redraft_cli.decode import DecodeConfig, Generator
from redraft_cli.sampling import SamplingConfig, logits_to_probs, sample
from redraft_cli.tree_attention import unpack_nodes
from redraft_cli.verify import Acceptance, _finish, _longest

VOCAB = 8
LAYERS = 1  # one layer is a third faster than two, and attention over the tree still matters
LOGIT_SCALE = 12.0  # entropy about 1.5 nats per token at T=1: spread, yet drafts often hit
PROMPT = [1, 2, 3, 4, 5]  # chosen so that no top-p=0.9 cut lies within 1e-3 of a boundary
ALPHA = 1e-3

# name -> (sampling, new tokens, beam width, beam length, generations per sampler)
CASES = {
    "T1.0": (SamplingConfig(temperature=1.0), 3, 3, 3, 3000),
    # Width 2 so that "every child rejected, sample from the rest of p" happens often too.
    "T0.7-top_p0.9": (SamplingConfig(temperature=0.7, top_p=0.9), 3, 2, 3, 3000),
    # Four tokens: the first ReDrafter step drafts two tokens per beam and the top-4 beams
    # share prefixes (tree dedup, chained acceptance, committing a two-node path).
    # Checked against the exact law only (the stronger test) to keep the file fast.
    "T1.0-deep": (SamplingConfig(temperature=1.0), 4, 4, 4, 3000),
}
PLAIN_CASES = ["T1.0", "T0.7-top_p0.9"]
WRONG_RULE_SAMPLES = 400
CELL_REDRAW_SAMPLES = 800

SEED0 = {"plain": 0, "redraft": 1_000_000, "wrong": 2_000_000, "cell-redraw": 3_000_000}


# -- statistics -------------------------------------------------------------------------

def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution: Q(df/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """The statistic whose survival probability is alpha (bisection on chi2_sf)."""
    lo, hi = 0.0, df + 100.0 * math.sqrt(df) + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return hi


def pool_cells(weights: torch.Tensor, minimum: float) -> list[torch.Tensor]:
    """Group cell indices so that each group's weight is >= minimum.

    Cells with weight >= minimum stay alone; the rest are pooled into one group,
    merged into the lightest single cell if the pool itself is still too light.
    """
    order = torch.argsort(weights, descending=True)
    big = [order[i : i + 1] for i in range(len(order)) if weights[order[i]] >= minimum]
    small = order[weights[order] < minimum]
    if len(small):
        if weights[small].sum() >= minimum or not big:
            big.append(small)
        else:
            big[-1] = torch.cat([big[-1], small])
    return big


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Chi-square GOF of observed counts against exact cell probabilities.

    Cells of probability zero must be empty (asserted by the caller); the rest
    are pooled to expected counts >= 5. Returns (statistic, df, p-value).
    """
    n = counts.sum().item()
    support = probs > 0
    expected = probs[support].double() * n
    observed = counts[support].double()
    groups = pool_cells(expected, 5.0)
    e = torch.stack([expected[g].sum() for g in groups])
    o = torch.stack([observed[g].sum() for g in groups])
    stat = float(((o - e) ** 2 / e).sum())
    df = len(groups) - 1
    return stat, df, chi2_sf(stat, df)


def fit_report(counts: torch.Tensor, probs: torch.Tensor, new_tokens: int) -> dict[str, tuple[float, int, float]]:
    """GOF of the joint law of all generated tokens and of each token's marginal law.

    The joint test is the omnibus one; the marginals (8 cells each) have more power
    against a bias concentrated on one position (e.g. the first drafted token).
    """
    shape = (VOCAB,) * new_tokens
    out = {"joint": goodness_of_fit(counts, probs)}
    for k in range(new_tokens):
        dims = tuple(d for d in range(new_tokens) if d != k)
        if dims:
            out[f"token {k + 1}"] = goodness_of_fit(counts.view(shape).sum(dims), probs.view(shape).sum(dims))
    return out


def format_report(report: dict[str, tuple[float, int, float]]) -> str:
    return "; ".join(f"{name}: chi2={st:.1f} df={df} crit={chi2_critical(df):.1f} p={pv:.3g}"
                     for name, (st, df, pv) in report.items())


def homogeneity(counts_a: torch.Tensor, counts_b: torch.Tensor) -> tuple[float, int, float]:
    """Chi-square two-sample homogeneity test on a 2 x K table (cells pooled to
    combined counts >= 10). Returns (statistic, df, p-value)."""
    table = torch.stack([counts_a, counts_b]).double()
    groups = pool_cells(table.sum(0), 10.0)
    pooled = torch.stack([table[:, g].sum(-1) for g in groups], dim=1)  # (2, K)
    expected = pooled.sum(1, keepdim=True) * pooled.sum(0, keepdim=True) / pooled.sum()
    stat = float(((pooled - expected) ** 2 / expected).sum())
    df = pooled.shape[1] - 1
    return stat, df, chi2_sf(stat, df)


def test_chi2_helpers_match_known_values():
    # Reference values of the chi-square distribution (tables / scipy.stats.chi2).
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(2.0 * 100, 200) == pytest.approx(0.4867, abs=1e-3)
    assert chi2_critical(10, 1e-3) == pytest.approx(29.588298445074418, rel=1e-6)
    assert chi2_critical(100, 1e-3) == pytest.approx(149.44925277903474, rel=1e-6)
    # A sample drawn from the exact law passes GOF; a shifted law fails.
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.02, 0.01, 0.0])
    counts = torch.bincount(torch.multinomial(probs, 5000, replacement=True, generator=gen), minlength=7)
    assert goodness_of_fit(counts, probs)[2] > 1e-3
    assert goodness_of_fit(counts, torch.tensor([0.35, 0.35, 0.2, 0.07, 0.02, 0.01, 0.0]))[2] < 1e-6
    other = torch.bincount(torch.multinomial(probs, 5000, replacement=True, generator=gen), minlength=7)
    assert homogeneity(counts, other)[2] > 1e-3


# -- the target and its exact law --------------------------------------------------------------

class ExactTarget:
    """Next-token logits of the tiny target by full forwards (no cache), memoised by context."""

    def __init__(self, target) -> None:
        self.target = target
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}
        self.node_memo: dict[tuple, torch.Tensor] = {}

    def logits(self, context) -> torch.Tensor:
        key = tuple(int(t) for t in context)
        if key not in self.memo:
            with torch.no_grad():
                self.memo[key] = self.target.model(torch.tensor([key])).logits[0, -1].float()
        return self.memo[key]

    def joint(self, prompt: list[int], sampling: SamplingConfig, n: int) -> torch.Tensor:
        """Exact probability of every n-token continuation, flattened to (V**n,) float64.

        Also checks that top-p never sits within 1e-4 of a cut, so the fp noise
        between these full forwards and the cached/tree forwards cannot change
        which tokens are kept.
        """
        probs = torch.zeros(VOCAB ** n, dtype=torch.float64)
        for idx, seq in enumerate(itertools.product(range(VOCAB), repeat=n)):
            p = 1.0
            for k in range(n):
                node = self.node_probs(prompt + list(seq[:k]), sampling)
                p *= float(node[seq[k]])
                if p == 0.0:
                    break
            probs[idx] = p
        assert abs(probs.sum().item() - 1.0) < 1e-5
        return probs

    def logprobs(self, context) -> torch.Tensor:
        """log p(. | context) at T=1 (what the proposer ranks by)."""
        return self.node_probs(context, SamplingConfig(temperature=1.0)).log()

    def node_probs(self, context, sampling: SamplingConfig) -> torch.Tensor:
        key = (tuple(int(t) for t in context), sampling.temperature, sampling.top_k, sampling.top_p)
        if key not in self.node_memo:
            logits = self.logits(context)
            if sampling.top_p < 1.0:
                sorted_p = torch.softmax(logits.double() / sampling.temperature, -1).sort(descending=True).values
                before = torch.cumsum(sorted_p, 0) - sorted_p
                assert (before - sampling.top_p).abs().min() > 1e-4, "top-p cut too close to call"
            self.node_memo[key] = logits_to_probs(logits, sampling).double()
        return self.node_memo[key]


def seq_index(tokens: list[int]) -> int:
    idx = 0
    for t in tokens:
        idx = idx * VOCAB + t
    return idx


class TargetTopProposer:
    """Test double: the W most likely continuations of length L-1 under the target itself
    (T=1, brute force over V**(L-1)), with their per-token log-probabilities. Beams are
    distinct and start with g0 (all equal [g0] when L == 1, like the real beam search)."""

    def __init__(self, exact: ExactTarget) -> None:
        self.exact = exact
        self.calls = 0

    def __call__(self, h, g0, beam_width, beam_length, context):
        self.calls += 1
        g = int(g0[0])
        assert context[-1] == g, "the context handed to the proposer must end with g0"
        W, L = beam_width, beam_length
        if L == 1:
            return DraftBeams(torch.full((1, W, 1), g, dtype=torch.long), torch.zeros(1, W, 0))
        scored = []
        for cont in itertools.product(range(VOCAB), repeat=L - 1):
            lps, ctx = [], list(context)
            for tok in cont:
                lps.append(float(self.exact.logprobs(ctx)[tok]))
                ctx.append(tok)
            scored.append((sum(lps), cont, lps))
        scored.sort(key=lambda s: -s[0])
        best = scored[:W]
        tokens = torch.tensor([[[g, *cont] for _, cont, _ in best]], dtype=torch.long)
        logprobs = torch.tensor([[lps for _, _, lps in best]], dtype=torch.float32)
        return DraftBeams(tokens, logprobs)


class RatioRuleGenerator(Generator):
    """A deliberately WRONG acceptance rule: the reference implementation's p/q ratio test
    with deterministic drafts. Each beam cell independently accepts its drafted token x
    with probability min(1, p(x) / q(x)), q(x) = exp(drafter log-probability); the longest
    run wins (first on ties); the bonus is drawn from normalize(max(p - q * onehot(x), 0))
    at the node where the chosen beam was rejected, or from p after a fully accepted beam.
    Because the drafts are a deterministic top-W, not samples from q, this is biased."""

    def _accept(self, beams, logits, unpack, cfg, gen):
        probs = logits_to_probs(logits, cfg.sampling)  # (1, n, V)
        grid = unpack_nodes(probs, unpack)[0]  # (W, L, V)
        drafted = beams.tokens[0, :, 1:]  # (W, L-1)
        W, L = beams.tokens.shape[1:]
        p = grid[:, :-1].gather(-1, drafted.unsqueeze(-1)).squeeze(-1)  # (W, L-1)
        q = beams.logprobs[0].exp()
        u = torch.rand(p.shape, generator=gen)
        accept = u < torch.clamp(p / q, max=1.0)
        length = torch.cumprod(accept.long(), -1).sum(-1)  # (W,)
        beam = int(length.argmax())
        a = int(length[beam])
        end = grid[beam, a].clone()
        if a < L - 1:
            x = int(drafted[beam, a])
            end[x] = (end[x] - q[beam, a]).clamp_min(0.0)
            if end.sum() <= 0:
                end = grid[beam, a].clone()
        bonus = torch.multinomial(end / end.sum(), 1, generator=gen)
        return Acceptance(torch.tensor([beam]), torch.tensor([a]), bonus.view(1), unpack[:, beam])


class CellRedrawGenerator(Generator):
    """A subtler WRONG rule: the lossless rule's per-node draw done per beam *cell*, so a
    node shared by several beams is drawn once per beam and the longest match wins; this
    biases acceptance upwards (verify.py's docstring warns against exactly this)."""

    def _accept(self, beams, logits, unpack, cfg, gen):
        cell_probs = unpack_nodes(logits_to_probs(logits, cfg.sampling), unpack)  # (1, W, L, V)
        choice = sample(cell_probs, gen)  # (1, W, L): one draw per cell
        beam, length = _longest(beams.tokens[:, :, 1:] == choice[:, :, :-1])
        return _finish(beam, length, choice, unpack)


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env():
    """The tiny target on one intra-op thread (tiny matmuls are much faster that way on small
    CPUs, and results do not depend on the thread count); the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    target = tiny_llama(vocab_size=VOCAB, layers=LAYERS, logit_scale=LOGIT_SCALE)
    exact = ExactTarget(target)
    yield target, exact
    torch.set_num_threads(threads)


_SAMPLES: dict[tuple[str, str], tuple[torch.Tensor, dict]] = {}


def draw(env, case: str, mode: str, n: int | None = None) -> tuple[torch.Tensor, dict]:
    """Counts over the V**new_tokens joint cells for `n` generations; memoised per (case, mode)."""
    key = (case, mode)
    if key in _SAMPLES:
        return _SAMPLES[key]
    target, exact = env
    sampling, new_tokens, width, length, default_n = CASES[case]
    n = n or default_n
    proposer = TargetTopProposer(exact)
    cls = {"wrong": RatioRuleGenerator, "cell-redraw": CellRedrawGenerator}.get(mode, Generator)
    gen = cls(target, proposer=proposer)
    seed0 = SEED0[mode]
    counts = torch.zeros(VOCAB ** new_tokens, dtype=torch.int64)
    stats = {"steps": 0, "accepted": 0, "full": 0}
    for i in range(n):
        cfg = DecodeConfig(max_new_tokens=new_tokens, beam_width=width, beam_length=length,
                           accept="rejection", sampling=replace(sampling, seed=seed0 + i), stop_on_eos=False)
        out = gen.generate(PROMPT, cfg, mode="plain" if mode == "plain" else "redraft")
        tokens = out.tokens
        assert len(tokens) == new_tokens
        counts[seq_index(tokens)] += 1
        if mode != "plain":
            first = out.decode_steps[0]
            stats["steps"] += 1
            stats["accepted"] += first.accepted
            stats["full"] += first.accepted == min(length, new_tokens - 1) - 1
    _SAMPLES[key] = (counts, stats)
    return counts, stats


def exact_law(env, case: str) -> torch.Tensor:
    sampling, new_tokens, *_ = CASES[case]
    return env[1].joint(PROMPT, sampling, new_tokens)


# -- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", PLAIN_CASES)
def test_plain_sampling_fits_exact_law(env, case):
    """Sanity of the harness: plain sampling against the enumerated law."""
    probs = exact_law(env, case)
    counts, _ = draw(env, case, "plain")
    assert counts[probs == 0].sum() == 0, "plain sampling produced an impossible sequence"
    report = fit_report(counts, probs, CASES[case][1])
    print(f"\n[{case}] plain GOF: {format_report(report)}")
    assert all(pval > ALPHA for _, _, pval in report.values())


@pytest.mark.parametrize("case", list(CASES))
def test_redraft_rejection_fits_exact_law(env, case):
    probs = exact_law(env, case)
    counts, stats = draw(env, case, "redraft")
    # The drafts must actually be accepted often, or the test would not exercise the rule.
    rate = stats["accepted"] / stats["steps"]
    assert rate > 0.3, f"drafted tokens accepted per first step {rate:.2f}: drafts too poor for this test"
    assert counts[probs == 0].sum() == 0, "ReDrafter produced a sequence of probability zero"
    report = fit_report(counts, probs, CASES[case][1])
    print(f"\n[{case}] redraft GOF: {format_report(report)}; "
          f"drafted tokens accepted in the first step={rate:.2f}, fully accepted={stats['full'] / stats['steps']:.2f}")
    assert all(pval > ALPHA for _, _, pval in report.values())


@pytest.mark.parametrize("case", PLAIN_CASES)
def test_redraft_rejection_matches_plain_sampling(env, case):
    plain, _ = draw(env, case, "plain")
    fast, _ = draw(env, case, "redraft")
    stat, df, pval = homogeneity(plain, fast)
    print(f"\n[{case}] plain vs redraft: chi2={stat:.1f} df={df} crit={chi2_critical(df):.1f} p={pval:.3g}")
    assert pval > ALPHA


@pytest.mark.parametrize("case", PLAIN_CASES)
def test_wrong_ratio_rule_is_detected(env, case):
    """Power: the p/q ratio rule with deterministic drafts is not lossless, and the same
    tests (with fewer samples) reject it by a wide margin."""
    probs = exact_law(env, case)
    wrong, _ = draw(env, case, "wrong", WRONG_RULE_SAMPLES)
    stat, df, pval = goodness_of_fit(wrong, probs)
    crit = chi2_critical(df)
    plain, _ = draw(env, case, "plain")
    h_stat, h_df, h_pval = homogeneity(plain, wrong)
    h_crit = chi2_critical(h_df)
    print(f"\n[{case}] wrong rule GOF: chi2={stat:.1f} df={df} crit={crit:.1f} p={pval:.3g}; "
          f"vs plain: chi2={h_stat:.1f} df={h_df} crit={h_crit:.1f} p={h_pval:.3g}")
    assert stat > 2 * crit and pval < 1e-9
    assert h_stat > 2 * h_crit and h_pval < 1e-9


def test_per_cell_redraw_is_detected(env):
    """Power against a subtle bug: with shared tree nodes (the deep case), drawing once per
    beam cell instead of once per node is rejected by the exact-law test, even with far fewer
    samples than the lossless rule passes with."""
    case = "T1.0-deep"
    probs = exact_law(env, case)
    counts, _ = draw(env, case, "cell-redraw", CELL_REDRAW_SAMPLES)
    report = fit_report(counts, probs, CASES[case][1])
    print(f"\n[{case}] per-cell redraw GOF: {format_report(report)}")
    stat, df, pval = report["joint"]
    assert stat > 1.5 * chi2_critical(df) and pval < 1e-6
    # The bias sits on the first drafted token: its marginal rejects by a wide margin.
    stat, df, pval = report["token 2"]
    assert stat > 3 * chi2_critical(df) and pval < 1e-12


def test_inverse_cdf_never_draws_a_token_of_probability_zero(monkeypatch):
    """u = rand x total is a float32 product that can round up to the total itself: searchsorted then
    runs past the end, and the last vocabulary token was returned even with probability 0 (a tail that
    top-k or top-p cut). The last token with p > 0 is returned instead; interior zeros are never chosen."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda n, m, **kw: torch.ones(n, m))  # u == the total exactly
    assert sample(probs, None).tolist() == [3, 1]
    monkeypatch.setattr(torch, "rand", lambda n, m, **kw: torch.full((n, m), 0.2))  # u on a cdf step: past the zero
    assert sample(probs, None).tolist() == [2, 1]
    monkeypatch.undo()
    draws = sample(probs.repeat(2000, 1), torch.Generator().manual_seed(0))
    assert set(draws[0::2].tolist()) == {0, 2, 3} and set(draws[1::2].tolist()) == {1}
