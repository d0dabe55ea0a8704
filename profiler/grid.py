"""The `--grid` language of `qos profile`: "quantized=0,25%,50%;bits=4,2;gpu_experts=50%,100%;prefetch=0,1"."""

from __future__ import annotations

import itertools

INT_KNOBS = ("quantized", "bits", "gpu_experts", "gpu_budget", "cache_slots", "group_size", "seed")
STR_KNOBS = ("selection", "offload")
BOOL_KNOBS = ("prefetch",)
BOOLS = {"0": False, "false": False, "no": False, "off": False, "1": True, "true": True, "yes": True, "on": True}
PERCENT_OK = ("quantized", "gpu_experts")  # "25%" means a quarter of the model's experts


def _value(key: str, text: str, total: int):
    text = text.strip()
    if key in STR_KNOBS:
        return text
    if key in BOOL_KNOBS:
        if text.lower() not in BOOLS:
            raise ValueError(f"grid: {key}={text!r} is not a boolean; use 0 or 1 (false or true)")
        return BOOLS[text.lower()]
    if text.endswith("%"):
        if key not in PERCENT_OK:
            raise ValueError(f"grid: {key} does not take percentages ({text!r}); only {', '.join(PERCENT_OK)} do")
        try:
            share = float(text[:-1])
        except ValueError:
            raise ValueError(f"grid: {key}={text!r} is not a percentage") from None
        if not 0 <= share <= 100:
            raise ValueError(f"grid: {key}={text!r} is outside 0%..100%")
        return round(total * share / 100)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"grid: {key}={text!r} is not an integer") from None


def parse_grid(text: str, total_experts: int) -> list[dict]:
    """Every combination of the grid's values, as keyword arguments of placement.plan.Knobs."""
    axes: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"grid: {part!r} should look like key=v1,v2")
        if key not in INT_KNOBS + STR_KNOBS + BOOL_KNOBS:
            raise ValueError(f"grid: unknown knob {key!r}; knobs: {', '.join(INT_KNOBS + STR_KNOBS + BOOL_KNOBS)}")
        if key in axes:
            raise ValueError(f"grid: {key} is given twice")
        axes[key] = list(dict.fromkeys(_value(key, v, total_experts) for v in values.split(",")))
    if "gpu_experts" in axes and "gpu_budget" in axes:
        raise ValueError("grid: give gpu_experts or gpu_budget, not both")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
