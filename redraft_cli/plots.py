"""Figures: the sweep's two heatmaps (speedup, tokens per step) over beam width x beam length.

Matplotlib's object interface on the Agg canvas: no pyplot, no global backend
switch, nothing shown on screen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _best_per_shape(result: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """(width, length) -> its fastest cell over the node budgets tried (the only one without budgets)."""
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for c in result["cells"]:
        key = (c["beam_width"], c["beam_length"])
        old = cells.get(key)
        if old is None or (c.get("speedup") or 0.0) > (old.get("speedup") or 0.0):
            cells[key] = c
    return cells


def _grid(result: dict[str, Any], key: str) -> list[list[float]]:
    """rows = beam widths, columns = beam lengths; NaN where a cell is missing. With several node
    budgets, each square shows the fastest budget's cell (`_labels` names the budget)."""
    cells = _best_per_shape(result)
    grid = []
    for w in result["beam_widths"]:
        row = []
        for length in result["beam_lengths"]:
            v = cells.get((w, length), {}).get(key)
            row.append(float(v) if v is not None else math.nan)
        grid.append(row)
    return grid


def _labels(result: dict[str, Any]) -> list[list[str]]:
    """Under each square's value: the node budget of the cell shown, when the sweep tried budgets."""
    cells = _best_per_shape(result)
    if not any(c.get("tree_nodes") for c in result["cells"]):
        return [["" for _ in result["beam_lengths"]] for _ in result["beam_widths"]]
    return [[(f"\nbest {n}" if (n := cells.get((w, length), {}).get("tree_nodes")) else "\nall")
             for length in result["beam_lengths"]] for w in result["beam_widths"]]


def _heatmap(fig, ax, result: dict[str, Any], grid: list[list[float]], title: str, fmt: str,
             cmap: str, norm, label: str):
    import numpy as np

    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    image = ax.imshow(data, cmap=cmap, norm=norm, origin="lower", aspect="auto")
    widths, lengths = result["beam_widths"], result["beam_lengths"]
    ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
    ax.set_yticks(range(len(widths)), [str(v) for v in widths])
    ax.set_xlabel("beam length (tokens per beam, counting g0)")
    ax.set_ylabel("beam width (beams per step)")
    ax.set_title(title)
    cmap_obj = image.get_cmap()
    labels = _labels(result)
    for i in range(len(widths)):
        for j in range(len(lengths)):
            v = grid[i][j]
            if math.isnan(v):
                continue
            r, g, b, _ = cmap_obj(norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, fmt.format(v) + labels[i][j], ha="center", va="center", fontsize=10,
                    color="white" if dark else "black")
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label(label)
    return cbar


def sweep_figure(result: dict[str, Any]):
    """A matplotlib Figure (Agg canvas) with the speedup and tokens-per-step heatmaps side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_speed, ax_tps = fig.subplots(1, 2)

    speed = _grid(result, "speedup")
    values = [v for row in speed for v in row if not math.isnan(v)] or [1.0]
    # Diverging around 1.0x: red is slower than plain decoding, green faster.
    lo, hi = min(min(values), 0.95), max(max(values), 1.05)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi)
    cbar = _heatmap(fig, ax_speed, result, speed, "Speedup vs plain decoding (tokens/s ratio)", "{:.2f}x",
                    "RdYlGn", norm, "speedup (x), 1.00x = plain decoding")
    # The two halves of the bar have different scales: label their ends and the middle of each.
    cbar.set_ticks([lo, (lo + 1) / 2, 1.0, (1 + hi) / 2, hi], labels=[
        f"{v:.2f}x" for v in (lo, (lo + 1) / 2, 1.0, (1 + hi) / 2, hi)])

    tps = _grid(result, "tokens_per_step")
    values = [v for row in tps for v in row if not math.isnan(v)] or [1.0]
    lo, hi = min(values), max(values)
    if hi - lo < 0.1:
        lo, hi = lo - 0.05, hi + 0.05
    _heatmap(fig, ax_tps, result, tps, "Tokens per step (per target pass)", "{:.2f}",
             "viridis", Normalize(vmin=lo, vmax=hi), "tokens per step")

    best = result.get("best")
    if best is not None:
        i = result["beam_widths"].index(best["beam_width"])
        j = result["beam_lengths"].index(best["beam_length"])
        ax_speed.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))

    base = result.get("baseline") or {}
    best_txt = (f"best {best['beam_width']}x{best['beam_length']}"
                + (f" (best {best['tree_nodes']} nodes)" if best.get("tree_nodes") else "")
                + f" at {best['speedup']:.2f}x"
                if best is not None and best.get("speedup") is not None else "no best cell")
    fig.suptitle(
        f"redraft sweep: {result.get('model', '?')} | drafter {result.get('drafter', '?')} | "
        f"{result.get('accept', '?')} T={result.get('temperature', '?')}\n"
        f"{result.get('num_prompts', '?')} prompts x {result.get('max_new_tokens', '?')} tokens | "
        f"plain baseline {base.get('tokens_per_s', 0):.1f} tokens/s | {best_txt} (boxed)"
        + (f" | {result['device']}" if result.get("device") else ""),
        fontsize=11,
    )
    return fig


def save_sweep_plot(result: dict[str, Any], path: str | Path, dpi: int = 120) -> Path:
    """Write the sweep heatmaps to `path` (format from the suffix: .png, .svg, .pdf)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_figure(result).savefig(out, dpi=dpi)
    return out
