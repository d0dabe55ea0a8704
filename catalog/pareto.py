"""Pareto fronts over measured plans (rows of a profile or search file). Pure pandas, no tensors."""

from __future__ import annotations

import pandas as pd

DEFAULT_OBJECTIVES = (("decode_tok_s", "max"), ("ppl", "min"), ("gpu_bytes", "min"))


def parse_objectives(text: str) -> tuple[tuple[str, str], ...]:
    """'decode_tok_s:max,ppl:min' -> (('decode_tok_s', 'max'), ('ppl', 'min'))."""
    objectives = []
    for part in text.split(","):
        column, _, sense = part.strip().partition(":")
        if sense not in ("max", "min"):
            raise ValueError(f"objective {part!r} should be COLUMN:max or COLUMN:min")
        objectives.append((column, sense))
    return tuple(objectives)


def pareto_mask(df: pd.DataFrame, objectives=DEFAULT_OBJECTIVES) -> pd.Series:
    """True for rows no other row dominates (at least as good in every objective, better in one).
    Rows missing an objective are never on the front."""
    for column, _ in objectives:
        if column not in df.columns:
            raise ValueError(f"objective column {column!r} is not in the file")
    # minimise everything: flip the maximised columns
    values = pd.concat([df[c] if s == "min" else -df[c] for c, s in objectives], axis=1).to_numpy(dtype=float)
    valid = ~pd.isna(values).any(axis=1)
    mask = []
    for i, row in enumerate(values):
        if not valid[i]:
            mask.append(False)
            continue
        others = values[valid]
        dominated = ((others <= row).all(axis=1) & (others < row).any(axis=1)).any()
        mask.append(not dominated)
    return pd.Series(mask, index=df.index, name="pareto")


def front(df: pd.DataFrame, objectives=DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """The Pareto-optimal rows, best first by the first objective."""
    column, sense = objectives[0]
    return df[pareto_mask(df, objectives)].sort_values(column, ascending=sense == "min")


def _minimised(df: pd.DataFrame, objectives) -> list[tuple[float, ...]]:
    return [tuple(float(r[c]) if s == "min" else -float(r[c]) for c, s in objectives)
            for _, r in df.dropna(subset=[c for c, _ in objectives]).iterrows()]


def _hv2(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` (both minimised) and bounded by `ref`."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def hypervolume(df: pd.DataFrame, reference: tuple[float, ...], objectives=DEFAULT_OBJECTIVES) -> float:
    """The volume the rows dominate up to `reference` (given in the objectives' own units and
    senses, e.g. (min tok/s, max ppl, max bytes)). Exact, by slicing along the last objective."""
    if len(objectives) not in (2, 3) or len(reference) != len(objectives):
        raise ValueError("hypervolume takes 2 or 3 objectives and a reference value for each")
    ref = tuple(v if s == "min" else -v for v, (_, s) in zip(reference, objectives))
    points = [p for p in _minimised(df, objectives) if all(a < b for a, b in zip(p, ref))]
    if len(objectives) == 2:
        return _hv2(points, ref)
    points.sort(key=lambda p: p[2])
    volume = 0.0
    for i, p in enumerate(points):
        top = points[i + 1][2] if i + 1 < len(points) else ref[2]
        volume += (top - p[2]) * _hv2([q[:2] for q in points[: i + 1]], ref[:2])
    return volume
