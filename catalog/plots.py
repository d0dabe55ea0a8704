"""Pictures of a profile or search file: the quality/throughput front and a throughput heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from catalog.pareto import pareto_mask  # noqa: E402


def paper_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's one-dimensional sweep inside a file: random selection, every expert on the
    accelerator the file has most of, quantized count stepping (rows marked `sweep` when a search
    wrote them)."""
    if "source" in df.columns and (df["source"] == "sweep").any():
        return df[df["source"] == "sweep"]
    sweep = df[(df["selection"] == "random") & (df["gpu_experts"] == df["gpu_experts"].max())]
    return sweep


def plot_front(df: pd.DataFrame, path: Path, title: str) -> Path:
    """Perplexity against decode tok/s, colored by accelerator GB; the 2-D front and the sweep."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    gb = df["gpu_bytes"] / 1e9
    points = ax.scatter(df["decode_tok_s"], df["ppl"], c=gb, cmap="viridis", s=28, alpha=0.85)
    fig.colorbar(points, ax=ax, label="accelerator GB")
    on_front = df[pareto_mask(df, (("decode_tok_s", "max"), ("ppl", "min")))].sort_values("decode_tok_s")
    ax.step(on_front["decode_tok_s"], on_front["ppl"], where="post", color="crimson", lw=1.5,
            label=f"front ({len(on_front)} plans)")
    sweep = paper_sweep(df)
    start = sweep[sweep["quantized"] == 0]  # the 16-bit plan starts every bit width's sweep
    for i, bits in enumerate(sorted(b for b in sweep["bits"].unique() if b != 16)):
        line = pd.concat([start, sweep[sweep["bits"] == bits]]).sort_values("quantized")
        ax.plot(line["decode_tok_s"], line["ppl"], "--o", ms=3, lw=1, color=("black", "gray", "tan")[i % 3],
                label=f"paper sweep, {bits}-bit (random, all on accelerator)")
    ax.set_xlabel("decode tokens/s (batch 1)")
    ax.set_ylabel("perplexity (mean of datasets)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(df: pd.DataFrame, path: Path, title: str) -> Path:
    """Decode tok/s over (quantized experts x accelerator experts), one panel per bit width,
    the median over the other knobs (like the paper's throughput heatmap)."""
    bits = sorted(b for b in df["bits"].unique() if b != 16) or [16]
    fig, axes = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bits):
        sub = df[(df["bits"] == b) | (df["quantized"] == 0)]
        grid = sub.pivot_table(index="gpu_experts", columns="quantized", values="decode_tok_s", aggfunc="median")
        image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="magma")
        ax.set_xticks(range(len(grid.columns)), grid.columns)
        ax.set_yticks(range(len(grid.index)), grid.index)
        for (i, j), v in pd.DataFrame(grid.to_numpy()).stack().items():
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < grid.max().max() * 0.6 else "black")
        ax.set_xlabel(f"quantized experts ({b}-bit)")
        ax.set_ylabel("accelerator experts")
        fig.colorbar(image, ax=ax, label="decode tok/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
