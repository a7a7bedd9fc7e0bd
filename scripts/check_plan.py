"""The planner against our own measurements: predicted vs measured optimizer-step times and counts.

    python -m dist_ortho.plan --calibrate --out cpu.json
    python scripts/bench_optimizer_step.py --json step.json
    python scripts/bench_grid.py --json grid.json
    python scripts/check_plan.py --device cpu.json --step step.json --grid grid.json

Run the three measurements one right after the other on the same machine (its speed drifts from hour to
hour). Prints, per TP size (bench_optimizer_step) and per DP x TP layout (bench_grid), every configuration's
measured and predicted milliseconds, their ratio, whether the planner's collectives, bytes and FLOPs per
rank equal the measured ones, and the order of the configurations by measured and by predicted time.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence

from dist_ortho.plan import Layout, Settings, estimate, load_profile, preset

# bench_grid's configurations: (arrangement, mode) of the planner; "grid fsdp2" runs the grid's plan on
# DTensors (its DP pieces move by all-to-all, which the planner does not model).
GRID_CONFIGS = {"replicated": ("replicated", "home"), "layer-wise": ("grid", "duplicated"), "grid": ("grid", "home")}


def _order(ms: dict[str, float]) -> str:
    """Labels by time; "=" joins times within 1% (the planner gives configurations that run the same plan,
    e.g. auto and the mode it chose, the same time)."""
    labels = sorted(ms, key=ms.get)
    out = labels[:1]
    for before, label in itertools.pairwise(labels):
        out += ["=" if ms[label] <= 1.01 * ms[before] else "<", label]
    return " ".join(out)


def _rows(title: str, measured: Sequence[tuple[str, float, tuple]], predicted: dict[str, tuple]) -> list[str]:
    out = []
    for label, ms, counts in sorted(measured, key=lambda r: r[1]):
        p_ms, p_counts = predicted[label]
        out.append(f"| {title} | {label} | {ms:.0f} | {p_ms:.0f} | {p_ms / ms:.2f} | "
                   f"{'yes' if counts == p_counts else f'no: measured {counts}, planned {p_counts}'} |")
    by_measured = _order({label: ms for label, ms, _ in measured})
    by_predicted = _order({k: v[0] for k, v in predicted.items()})
    out += [f"| {title} | measured order | {by_measured} | | | |", f"| {title} | predicted order | {by_predicted} | | | |"]
    return out


def step_table(profile, rows: list[dict]) -> list[str]:
    model, settings, out = preset("bench"), Settings(precision="highest"), []
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world and r["config"] != "home/plain"]
        estimates = {e.mode: e for e in estimate(model, Layout(tp=world, dp=1), profile, settings,
                                                 modes=[r["config"] for r in mine], arrangements=["replicated"])}
        measured = [(r["config"], r["median_ms"], (r["collectives"], r["bytes_sent_per_rank"], r["flops_per_rank_max"]))
                    for r in mine]
        predicted = {k: (1e3 * e.seconds, (e.calls, int(e.bytes), int(e.flops))) for k, e in estimates.items()}
        out += _rows(f"TP {world}", measured, predicted)
    return out


def grid_table(profile, rows: list[dict]) -> list[str]:
    model, settings, out = preset("bench"), Settings(precision="highest"), []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        dp, tp = (int(x) for x in layout.replace("DP ", "").replace("TP ", "").split(" x "))
        mine = [r for r in rows if r["layout"] == layout and r["config"] in GRID_CONFIGS]
        predicted = {}
        for r in mine:
            arrangement, mode = GRID_CONFIGS[r["config"]]
            (e,) = estimate(model, Layout(tp=tp, dp=dp), profile, settings, modes=[mode], arrangements=[arrangement])
            predicted[r["config"]] = (1e3 * e.seconds, (e.calls, int(e.bytes), int(e.flops)))
        measured = [(r["config"], r["ms"], (r["calls"], r["bytes"], r["flops"])) for r in mine]
        out += _rows(layout, measured, predicted)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="CPU", help="a built-in profile or the JSON --calibrate wrote")
    parser.add_argument("--step", help="bench_optimizer_step.py --json output")
    parser.add_argument("--grid", help="bench_grid.py --json output")
    args = parser.parse_args(argv)
    profile = load_profile(args.device)
    lines = ["| layout | configuration | measured ms | predicted ms | predicted / measured | counts equal (calls, bytes, FLOPs) |",
             "|---|---|---|---|---|---|"]
    if args.step:
        with open(args.step) as f:
            lines += step_table(profile, json.load(f)["rows"])
    if args.grid:
        with open(args.grid) as f:
            lines += grid_table(profile, json.load(f)["rows"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
