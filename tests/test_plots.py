"""The front and heatmap pictures say what they show: which objectives each front is over, units,
blank unmeasured cells, and cell labels readable against their cells. Checked on the artists."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from catalog import plots
from catalog.pareto import front
from catalog.rows import read_profile, with_ppl

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def plans(**extra) -> pd.DataFrame:
    """a and b are the 2-D (tok/s, perplexity) front; c is slower and worse than b but the
    smallest, so it joins the 3-objective front; d is dominated every way."""
    return pd.DataFrame({
        "plan_id": list("abcd"),
        "decode_tok_s": [100.0, 90.0, 80.0, 70.0],
        "ppl": [10.0, 9.0, 9.5, 11.0],
        "gpu_bytes": [4e9, 5e9, 2e9, 6e9],
        "quantized": [0, 4, 8, 8], "bits": [16, 4, 4, 2], "selection": "random", "gpu_experts": [8, 8, 4, 8],
    }).assign(**extra)


def committed(name: str) -> pd.DataFrame:
    return with_ppl(read_profile(RESULTS / name))  # as `qos front` and `qos plot` read it


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_front_legend_names_each_fronts_objectives_and_size():
    texts = legend_texts(plots.front_figure(plans(), "t"))
    assert texts[0] == "Pareto front of tok/s and perplexity (2 plans)"
    assert texts[1].startswith("on the Pareto front of tok/s, perplexity and accelerator memory (3 plans")


def test_front_marks_exactly_the_plans_of_each_front():
    ax = plots.front_figure(plans(), "t").axes[0]
    step = next(line for line in ax.get_lines() if line.get_label().startswith("Pareto front"))
    assert sorted(step.get_xdata()) == [90.0, 100.0]
    rings = next(c for c in ax.collections if c.get_label().startswith("on the Pareto front"))
    assert sorted(x for x, _ in rings.get_offsets()) == [80.0, 90.0, 100.0]


def test_front_counts_agree_with_qos_front_on_a_committed_file():
    # the file of the issue: `qos front` says 8 plans while the picture's own front has 2
    df = committed("profile_mixtral2_h100.csv")
    texts = legend_texts(plots.front_figure(df, "t"))
    assert f"({len(front(df))} plans" in texts[1]
    two_d = front(df, plots.PICTURE_OBJECTIVES)
    assert texts[0] == f"Pareto front of tok/s and perplexity ({len(two_d)} plans)"
    assert len(two_d) != len(front(df))  # else this file would not show the difference


@pytest.mark.parametrize("scale, unit", [(1.0, "GB"), (1e-3, "MB")])
def test_front_labels_carry_units(scale, unit):
    df = plans()
    fig = plots.front_figure(df.assign(gpu_bytes=df["gpu_bytes"] * scale), "t")
    ax, colorbar = fig.axes[0], fig.axes[1]
    assert "tok/s" in ax.get_xlabel()
    assert colorbar.get_ylabel() == f"accelerator memory ({unit})"
    assert f"({unit})" in ax.get_title()
    assert max(colorbar.get_ylim()) < 10  # 2..5 GB or MB, not 2e9 bytes or 0.005 GB


def sparse_grid() -> pd.DataFrame:
    """4-bit plans at three of the six (accelerator experts, quantized) cells, plus one 16-bit."""
    return pd.DataFrame({
        "gpu_experts": [8, 8, 4, 2], "quantized": [0, 4, 8, 4], "bits": [16, 4, 4, 4],
        "decode_tok_s": [300.0, 150.0, 20.0, 80.5],
    })


def panels(fig):
    return [ax for ax in fig.axes if ax.images]


def test_heatmap_leaves_unmeasured_cells_blank():
    (ax,) = panels(plots.heatmap_figure(sparse_grid(), "t"))
    values = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    assert np.isnan(values).sum() == 5  # 3 x 3 cells, 4 measured
    labels = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert "nan" not in labels.values()
    assert labels == {(i, j): plots.cell_text(v) for (i, j), v in np.ndenumerate(values) if np.isfinite(v)}
    assert sorted(labels.values()) == ["150", "20.0", "300", "80.5"]


def luminance(rgba) -> float:
    """WCAG 2 relative luminance."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a, b) -> float:
    la, lb = sorted((luminance(a), luminance(b)))
    return (lb + 0.05) / (la + 0.05)


@pytest.mark.parametrize("source", ["sparse", "search_vs_sweep_cpu.csv", "profile_reference_cpu.csv"])
def test_heatmap_labels_contrast_with_their_cells(source):
    df = sparse_grid() if source == "sparse" else committed(source)
    colours = set()
    for ax in panels(plots.heatmap_figure(df, "t")):
        image = ax.images[0]
        for text in ax.texts:
            x, y = text.get_position()
            cell = image.cmap(image.norm(image.get_array()[round(y), round(x)]))
            # 4.5:1 is WCAG's minimum for small text; black or white can always reach it
            assert contrast(to_rgba(text.get_color()), cell) >= 4.5, (text.get_text(), cell)
            colours.add(to_rgba(text.get_color()))
    assert len(colours) == 2  # both dark and light cells were checked


def test_heatmap_panels_share_one_colour_scale():
    df = pd.concat([sparse_grid(), sparse_grid().assign(bits=2, decode_tok_s=[300.0, 1000.0, 5.0, 7.0])])
    images = [ax.images[0] for ax in panels(plots.heatmap_figure(df, "t"))]
    assert len(images) == 2
    assert {(im.norm.vmin, im.norm.vmax) for im in images} == {(5.0, 1000.0)}


def test_text_colour_picks_the_stronger_contrast():
    magma = plt.get_cmap("magma")
    assert plots.text_colour(magma(0.0)) == "white"
    assert plots.text_colour(magma(1.0)) == "black"
    assert plots.text_colour(to_rgba("mediumblue")) == "white"  # dark by luminance, though saturated
    assert plots.text_colour(to_rgba("yellow")) == "black"


def test_pictures_are_written(tmp_path):
    assert plots.plot_front(plans(), tmp_path / "f.png", "t").read_bytes()[:4] == b"\x89PNG"
    assert plots.plot_heatmap(sparse_grid(), tmp_path / "h.png", "t").read_bytes()[:4] == b"\x89PNG"
    assert plt.get_fignums() == []  # closed, so a long search does not pile up figures
