"""Pictures of a profile or search file: the quality/throughput front and a throughput heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from catalog.pareto import DEFAULT_OBJECTIVES, pareto_mask  # noqa: E402

# The picture has two axes, so its front is over these two; `qos front` uses DEFAULT_OBJECTIVES.
PICTURE_OBJECTIVES = (("decode_tok_s", "max"), ("ppl", "min"))
# What legends call the objective columns.
OBJECTIVE_NAMES = {"decode_tok_s": "tok/s", "ppl": "perplexity", "gpu_bytes": "accelerator memory"}


def objective_names(objectives) -> str:
    """(('decode_tok_s', 'max'), ('ppl', 'min')) -> 'tok/s and perplexity'."""
    names = [OBJECTIVE_NAMES.get(column, column) for column, _ in objectives]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def bytes_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, unit): GB for real models, MB for the tiny reference ones, where GB reads 0.04."""
    return (1e9, "GB") if max_bytes >= 1e9 else (1e6, "MB")


def paper_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's one-dimensional sweep inside a file: random selection, every expert on the
    accelerator the file has most of, quantized count stepping (rows marked `sweep` when a search
    wrote them)."""
    if "source" in df.columns and (df["source"] == "sweep").any():
        return df[df["source"] == "sweep"]
    sweep = df[(df["selection"] == "random") & (df["gpu_experts"] == df["gpu_experts"].max())]
    return sweep


def front_figure(df: pd.DataFrame, title: str, objectives=DEFAULT_OBJECTIVES) -> Figure:
    """Perplexity against decode tok/s, colored by accelerator memory; the 2-D front of the
    picture, the plans on the full `objectives` front (what `qos front` lists) and the sweep."""
    fig, ax = plt.subplots(figsize=(7.5, 6), layout="constrained")
    divisor, unit = bytes_unit(df["gpu_bytes"].max())
    points = ax.scatter(df["decode_tok_s"], df["ppl"], c=df["gpu_bytes"] / divisor, cmap="viridis", s=28, alpha=0.85)
    fig.colorbar(points, ax=ax, label=f"accelerator memory ({unit})")
    _draw_fronts(ax, df, objectives)
    _draw_sweep(ax, df)
    ax.set_xlabel("decode tok/s (batch 1)")
    ax.set_ylabel("perplexity (mean of datasets)")
    ax.set_title(f"{title}\nperplexity vs decode tok/s, colour: accelerator memory ({unit})", fontsize=10)
    ax.grid(alpha=0.3)
    # below the axes: inside, it hid the fast plans, which are the ones a reader looks for
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    return fig


def _draw_fronts(ax, df: pd.DataFrame, objectives) -> None:
    """The 2-D front as a staircase, and rings on the plans of the full front, each legend entry
    naming its objectives: the two fronts differ, and `qos front` reports the full one."""
    flat = df[pareto_mask(df, PICTURE_OBJECTIVES)].sort_values("decode_tok_s")
    # "pre": the corner between two front plans is (slower x, worse y), a point they both attain
    ax.step(flat["decode_tok_s"], flat["ppl"], where="pre", color="crimson", lw=1.5, marker="o", ms=3,
            label=f"Pareto front of {objective_names(PICTURE_OBJECTIVES)} ({len(flat)} plans)")
    if tuple(objectives) == PICTURE_OBJECTIVES:
        return
    full = df[pareto_mask(df, objectives)]
    ax.scatter(full["decode_tok_s"], full["ppl"], s=90, facecolors="none", edgecolors="crimson", lw=1,
               label=f"on the Pareto front of {objective_names(objectives)} ({len(full)} plans, as `qos front` lists)")


def _draw_sweep(ax, df: pd.DataFrame) -> None:
    sweep = paper_sweep(df)
    start = sweep[sweep["quantized"] == 0]  # the 16-bit plan starts every bit width's sweep
    for i, bits in enumerate(sorted(b for b in sweep["bits"].unique() if b != 16)):
        line = pd.concat([start, sweep[sweep["bits"] == bits]]).sort_values("quantized")
        ax.plot(line["decode_tok_s"], line["ppl"], "--o", ms=3, lw=1, color=("black", "gray", "tan")[i % 3],
                label=f"paper sweep, {bits}-bit (random, all on accelerator)")


def plot_front(df: pd.DataFrame, path: Path, title: str) -> Path:
    return _save(front_figure(df, title), path)


def tok_s_grid(df: pd.DataFrame, bits: int) -> pd.DataFrame:
    """Median decode tok/s over (accelerator experts x quantized experts) at one bit width; NaN
    where no plan was measured. The 16-bit plans (nothing quantized) are column 0 of every width."""
    sub = df[(df["bits"] == bits) | (df["quantized"] == 0)]
    return sub.pivot_table(index="gpu_experts", columns="quantized", values="decode_tok_s", aggfunc="median")


def heatmap_figure(df: pd.DataFrame, title: str) -> Figure:
    """Decode tok/s over (quantized experts x accelerator experts), one panel per bit width,
    the median over the other knobs (like the paper's throughput heatmap)."""
    bits = sorted(b for b in df["bits"].unique() if b != 16) or [16]
    grids = [tok_s_grid(df, b) for b in bits]
    # one colour scale for all panels, so one colour is one speed everywhere
    norm = Normalize(min(np.nanmin(g.to_numpy()) for g in grids), max(np.nanmax(g.to_numpy()) for g in grids))
    cmap = plt.get_cmap("magma").with_extremes(bad="whitesmoke")  # unmeasured cells: light and unlabelled
    cells = [max(len(g.columns), 4) for g in grids]  # panel width follows its columns, so labels fit
    width = 0.38 * sum(cells) + 1.3 * len(bits) + 1.2
    fig, axes = plt.subplots(1, len(bits), figsize=(width, 4), width_ratios=cells, squeeze=False, layout="constrained")
    for ax, b, grid in zip(axes[0], bits, grids):
        image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(grid.columns)), grid.columns)
        ax.set_yticks(range(len(grid.index)), grid.index)
        label_cells(ax, image)
        ax.set_xlabel(f"quantized experts ({b}-bit)")
        ax.set_ylabel("accelerator experts")
    fig.colorbar(image, ax=axes[0].tolist(), label="decode tok/s (batch 1)", fraction=0.6 / width)
    fig.suptitle(f"{title}\ndecode tok/s (batch 1), median over the other knobs; blank: not measured", fontsize=10)
    return fig


def label_cells(ax, image) -> None:
    """Write each measured cell's value in the colour that contrasts with it; skip the empty ones."""
    values = np.ma.filled(image.get_array().astype(float), np.nan)  # imshow masks the NaN cells
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, cell_text(v), ha="center", va="center", fontsize=7,
                    color=text_colour(image.cmap(image.norm(v))))


def cell_text(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def relative_luminance(rgba) -> float:
    """WCAG relative luminance of an sRGB colour: 0 for black, 1 for white."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background) -> str:
    """White or black, whichever has the higher WCAG contrast ratio against `background`."""
    lum = relative_luminance(background)
    return "white" if 1.05 / (lum + 0.05) > (lum + 0.05) / 0.05 else "black"


def plot_heatmap(df: pd.DataFrame, path: Path, title: str) -> Path:
    return _save(heatmap_figure(df, title), path)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
