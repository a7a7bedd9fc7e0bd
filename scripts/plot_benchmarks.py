"""Headline plots of the benchmarks: one PNG per docs/bench_*.json, shown beside its table in docs/benchmarks.md.

    .venv/bin/python scripts/plot_benchmarks.py [--docs docs] [--only bench_ns bench_dion ...]

Reads each ``DOCS/bench_X.json`` (the raw results a table of docs/benchmarks.md was made from) and writes
``DOCS/plots/bench_X.png`` (7 x 3.5 in, 100 dpi, matplotlib's Agg canvas). Each plot is the comparison its section
states, every number read from the JSON (ratios computed from its times):

- bench_ns: each mode's speed against ``duplicated`` for one matrix, per shape and partition dim, a panel per TP world;
- bench_optimizer_step: each configuration's speed against per-matrix duplicated, per TP world;
- bench_host: microseconds per matrix per step, dist_ortho against the peers and the floor, per shape;
- bench_overlap: waiting with ``--overlap`` over blocking (all of the step's, the optimizer's) and tokens/s, per layout;
- bench_megatron: upstream duplicated and our best exact mode against upstream blockwise, per wrapping and precision;
- bench_dion: each configuration's speed against Dion's Muon;
- bench_hsdp, bench_hsdp_experts: Newton-Schulz FLOPs per rank and step time, ours against every replica stepping all.

A JSON with no plotter here is an error naming it, so that a new benchmark gets its plot.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE, DPI = (7.0, 3.5), 100


def _figure(ncols: int = 1, **subplots: Any) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False, **subplots)
    return fig, list(axes[0])


def _title(fig: Figure, what: str, machine: Sequence[str] = ()) -> None:
    text = what + (f" ({', '.join(machine)})" if machine else "")
    fig.suptitle("\n".join(textwrap.wrap(text, 110)), fontsize=8.5)


def _bars(ax: Axes, groups: Sequence[str], series: dict[str, Sequence[float]], horizontal: bool = False,
          values: str = "") -> None:
    """Grouped bars: one group per label in ``groups``, one bar per series within a group; ``values``: a format
    for each bar's value written at its end ("" for none)."""
    width = 0.8 / len(series)
    for i, (label, heights) in enumerate(series.items()):
        at = [g - 0.4 + width * (i + 0.5) for g in range(len(groups))]
        bars = (ax.barh if horizontal else ax.bar)(at, heights, width, label=label)
        if values:
            ax.bar_label(bars, fmt=values, fontsize=6, padding=1)
    (ax.set_yticks if horizontal else ax.set_xticks)(range(len(groups)), groups, fontsize=6.5)
    ax.tick_params(labelsize=6.5)


def _baseline(ax: Axes, label: str, horizontal: bool = False) -> None:
    (ax.axvline if horizontal else ax.axhline)(1.0, color="black", linewidth=0.8, linestyle="--", label=label)


def _legend(ax: Axes, **kwargs: Any) -> None:
    ax.legend(fontsize=6.5, framealpha=0.8, **kwargs)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def plot_ns(data: dict[str, Any]) -> Figure:
    """bench_ns: per TP world > 1, each mode's speed against duplicated (its median time over each mode's)."""
    rows, args = data["rows"], data["args"]
    worlds = [w for w in args["worlds"] if w > 1]
    fig, axes = _figure(len(worlds), sharey=True)
    for ax, world in zip(axes, worlds):
        at = [r for r in rows if r["world"] == world]
        keys = list(dict.fromkeys((_shape(r["shape"]), r["partition_dim"]) for r in at))
        base = {(_shape(r["shape"]), r["partition_dim"]): r["median_ms"] for r in at if r["mode"] == "duplicated"}
        series: dict[str, list[float]] = {}
        for r in at:
            if r["mode"] != "duplicated":
                key = (_shape(r["shape"]), r["partition_dim"])
                series.setdefault(r["mode"], []).append(base[key] / r["median_ms"])
        _bars(ax, [f"{s}\npdim {p}" for s, p in keys], series)
        ax.tick_params(axis="x", labelsize=6)
        _baseline(ax, "duplicated")
        ax.set(yscale="log", title=f"TP {world}")
        ax.title.set_fontsize(8)
        ax.set_ylim(top=4 * max(max(v) for v in series.values()))
    axes[0].set_ylabel("speed vs duplicated (x, log)", fontsize=7)
    _legend(axes[0], loc="upper left", ncol=3)
    _title(fig, f"bench_ns: one matrix through newton_schulz_tp, {args['steps']} {args['coefficient_type']} steps, "
           f"precision {args['precision']}, median of {args['repeats']}: each mode's speed vs duplicated")
    return fig


def plot_optimizer_step(data: dict[str, Any]) -> Figure:
    """bench_optimizer_step: per TP world, each configuration's speed against duplicated/per-matrix."""
    rows, args = data["rows"], data["args"]
    base = {r["world"]: r["median_ms"] for r in rows if r["config"] == "duplicated/per-matrix"}
    series: dict[str, list[float]] = {}
    for r in rows:
        if r["config"] != "duplicated/per-matrix":
            series.setdefault(r["config"], []).append(base[r["world"]] / r["median_ms"])
    fig, (ax,) = _figure()
    _bars(ax, [f"TP {w}" for w in args["worlds"]], series)
    _baseline(ax, "duplicated/per-matrix")
    ax.set_ylabel("speed vs duplicated/per-matrix (x)", fontsize=7)
    _legend(ax, loc="upper left", ncol=2)
    _title(fig, f"bench_optimizer_step: one Muon step over the GPT-like set, precision "
           f"{args['precision']}, median of {args['repeats']}: speed vs per-matrix duplicated")
    return fig


def _host_panel(ax: Axes, rows: list[dict[str, Any]]) -> None:
    """Grouped bars per shape; a panel of one shape is horizontal, the optimizers named on its axis."""
    groups = {r["shape"]: f"{r['matrices']:,} x\n{r['shape'].replace(' (', chr(10) + '(')}" for r in rows}
    if len(groups) == 1:
        ax.barh(range(len(rows)), [r["us_per_matrix"] for r in rows], 0.6, color="tab:gray")
        ax.set_yticks(range(len(rows)), ["\n".join(textwrap.wrap(r["optimizer"], 24)) for r in rows], fontsize=6.5)
        ax.invert_yaxis()
        ax.set(xscale="log", title=next(iter(groups.values())).replace("\n", " "))
        ax.set_xlabel("us per matrix per step (log)", fontsize=7)
        ax.title.set_fontsize(7)
        ax.tick_params(labelsize=6.5)
        return
    series: dict[str, list[float]] = {}
    for r in rows:
        series.setdefault(r["optimizer"], []).append(r["us_per_matrix"])
    _bars(ax, list(groups.values()), series)
    ax.set(yscale="log")
    ax.set_ylabel("us per matrix per step (log)", fontsize=7)
    _legend(ax, loc="upper left")


def plot_host(data: dict[str, Any]) -> Figure:
    """bench_host: us per matrix per step per shape; shapes measured with the same optimizers share a panel."""
    panels: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    shapes = list(dict.fromkeys(r["shape"] for r in data["rows"]))
    for shape in shapes:
        rows = [r for r in data["rows"] if r["shape"] == shape]
        panels.setdefault(tuple(r["optimizer"] for r in rows), []).extend(rows)
    fig, axes = _figure(len(panels), width_ratios=[len(set(r["shape"] for r in p)) + 1 for p in panels.values()])
    for ax, rows in zip(axes, panels.values()):
        _host_panel(ax, rows)
    _title(fig, "bench_host: the step's host cost, grouped step against a loop per matrix, float32",
           [data["machine"]])
    return fig


def _short_layout(name: str) -> str:
    return name.replace(" (", "\n(").replace(", --", "\n--").replace(": ", ":\n")


def plot_overlap(data: dict[str, Any]) -> Figure:
    """bench_overlap: per layout, overlap / blocking of the step's waiting, the optimizer's and tokens/s."""
    layouts = list(data)
    ratio = {key: [data[k]["summary"]["overlap"][key] / data[k]["summary"]["blocking"][key] for k in layouts]
             for key in ("comm_wait_ms", "optimizer_comm_wait_ms", "tokens_per_s")}
    fig, (waits, tokens) = _figure(2, sharey=True, width_ratios=[3, 2])
    labels = [_short_layout(k) for k in layouts]
    _bars(waits, labels, {"all waiting (comm_wait_ms)": ratio["comm_wait_ms"],
                          "the optimizer's waiting": ratio["optimizer_comm_wait_ms"]}, horizontal=True, values="%.2f")
    waits.set_xlabel("waiting, overlap / blocking (x, lower is better)", fontsize=7)
    _bars(tokens, labels, {"tokens/s": ratio["tokens_per_s"]}, horizontal=True, values="%.2f")
    tokens.set_xlabel("tokens/s, overlap / blocking (x)", fontsize=7)
    for ax in (waits, tokens):
        _baseline(ax, "blocking", horizontal=True)
        ax.set_xlim(0, 1.2 * max(max(v) for v in ratio.values()))
        _legend(ax, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3)
    tokens.invert_yaxis()
    steps = {data[k]["args"]["steps"] for k in layouts}
    _title(fig, f"bench_overlap: the main job with --overlap against blocking, {'/'.join(map(str, steps))} steps, "
           "medians of the rounds")
    return fig


def _best_ours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min((r for r in rows if r["config"].startswith("ours")), key=lambda r: r["seconds"])


def plot_megatron(data: dict[str, Any]) -> Figure:
    """bench_megatron: per wrapping / precision, upstream duplicated and our fastest exact mode vs blockwise."""
    tables = data["tables"]
    dup, ours, names = [], [], []
    for table in tables.values():
        rows = {r["config"]: r for r in table["rows"]}
        base = rows["upstream blockwise"]["seconds"]
        best = _best_ours(table["rows"])
        dup.append(base / rows["upstream duplicated"]["seconds"])
        ours.append(base / best["seconds"])
        names.append(best["config"].removeprefix("ours "))
    fig, (ax,) = _figure()
    _bars(ax, [k.replace(" / ", "\n") for k in tables], {"upstream duplicated (exact)": dup,
                                                         "our best exact mode": ours})
    for i, (value, name) in enumerate(zip(ours, names)):
        ax.annotate(f"{name}\n{value:.2f}x", (i + 0.2, value), ha="center", va="bottom", fontsize=6,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
    _baseline(ax, "upstream blockwise (inexact)")
    ax.set_ylabel("speed vs upstream blockwise (x)", fontsize=7)
    ax.set_ylim(0, 1.25 * max(ours + dup))
    _legend(ax, loc="upper right")
    _title(fig, f"bench_megatron: {data['layers']} layers of GPTModel, hidden {data['hidden']}, in Megatron's "
           "wrappings: speed vs upstream blockwise", [f"megatron-core {data['megatron_core']}",
                                                    f"torch {data['torch']}", f"{data['cores']} cores"])
    return fig


def plot_dion(data: dict[str, Any]) -> Figure:
    """bench_dion: each configuration's speed against Dion's Muon, its collectives per step beside the bar."""
    rows = data["rows"]
    base = next(r for r in rows if r["config"] == "dion")["seconds"]
    speed = [base / r["seconds"] for r in rows]
    fig, (ax,) = _figure()
    ax.barh(range(len(rows)), speed, 0.6)
    ax.set_yticks(range(len(rows)), [r["config"] for r in rows], fontsize=7)
    for i, (value, r) in enumerate(zip(speed, rows)):
        ax.annotate(f" {value:.2f}x, {r['calls']} collectives, {r['bytes']:,} bytes / step", (value, i),
                    va="center", fontsize=6.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.6 * max(speed))
    ax.set_xlabel("speed vs dion (x), median step time", fontsize=7)
    ax.tick_params(labelsize=7)
    _title(fig, f"bench_dion: FSDP2 Shard(0), the same float32 Newton-Schulz, median of {data['repeats']}: "
           "speed vs Dion's Muon", [f"torch {data['torch']}", f"{data['cores']} cores"])
    return fig


def _ours_and_baseline(ax: Axes, labels: Sequence[str], values: Sequence[float], notes: Sequence[str] = ()) -> None:
    """One bar per configuration (ours blue, the baseline last, gray), each with its value (and its note)."""
    ax.bar(range(len(values)), values, 0.6, color=["tab:blue", "tab:gray"][: len(values)])
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    for i, (value, note) in enumerate(zip(values, notes or [""] * len(values))):
        ax.annotate(f"{value:.3g}{note}", (i, value), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.2 * max(values))
    ax.tick_params(labelsize=7)


def _hsdp(data: dict[str, Any], what: str) -> Figure:
    rows = data["rows"]
    labels = ["\n".join(textwrap.wrap(k, 22)) for k in rows]
    flops = [max(r["flops_per_rank"]) / 1e6 for r in rows.values()]
    seconds = [1e3 * r["seconds"] for r in rows.values()]
    baseline = list(rows)[-1].split(" (")[0]
    fig, axes = _figure(2)
    for ax, values, unit in zip(axes, (flops, seconds), ("Newton-Schulz MFLOP per rank (max)", "median step ms")):
        notes = [f" ({value / values[-1]:.2f}x {baseline})" for value in values[:-1]] + [""]
        _ours_and_baseline(ax, labels, values, notes)
        ax.set_ylabel(unit, fontsize=7)
    _title(fig, f"{what}, median of {data['args']['repeats']} steps; weights differ by {data['weight_difference']}")
    return fig


def plot_hsdp(data: dict[str, Any]) -> Figure:
    """bench_hsdp: HSDP's dense weights, ours against every replica stepping all."""
    args = data["args"]
    return _hsdp(data, f"bench_hsdp: HSDP, {args['layers']} blocks of hidden {args['hidden']}")


def plot_hsdp_experts(data: dict[str, Any]) -> Figure:
    """bench_hsdp_experts: expert stacks under HSDP, each stack owned by one replica against every replica."""
    args = data["args"]
    return _hsdp(data, f"bench_hsdp --experts: {args['layers']} layers of {args['experts']}-expert stacks, "
                       f"hidden {args['hidden']}")


def plot_grid(data: dict[str, Any]) -> Figure:
    """bench_grid: per DP x TP layout, each configuration's Newton-Schulz FLOPs per rank (max) against every matrix
    once over the world (left) and its speed against "replicated" (right)."""
    rows = data["rows"]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    at = {(r["layout"], r["config"]): r for r in rows}
    fig, axes = _figure(2)
    share = {c: [at[(lay, c)]["flops"] / (data["flops_once"] / at[(lay, c)]["world"]) for lay in layouts]
             for c in configs}
    speed = {c: [at[(lay, "replicated")]["ms"] / at[(lay, c)]["ms"] for lay in layouts] for c in configs}
    for ax, series, unit in ((axes[0], share, "NS FLOPs per rank (max) / (all matrices once / world)"),
                             (axes[1], speed, "speed vs replicated (x)")):
        _bars(ax, layouts, series, values="%.2f")
        _baseline(ax, "")
        ax.set_ylabel(unit, fontsize=7)
    _legend(axes[1], loc="upper left")
    _title(fig, f"bench_grid: one Muon step on the GPT-like set, float32 highest, median of {data['repeats']} steps: "
                "each matrix once in the grid against every replica stepping all",
           [f"torch {data['torch']}", f"{data['cores']} cores"])
    return fig


def plot_megatron_fsdp(data: dict[str, Any]) -> Figure:
    """bench_megatron_fsdp: ours against the all-gather baseline in exact counts: Newton-Schulz FLOPs, collectives
    and MB sent by the busiest rank (the time on 2 shared cores is noise at this size: not plotted)."""
    rows = data["rows"]
    names = list(rows)
    measures = (("NS MFLOP (busiest rank)", lambda r: max(r["flops_per_rank"]) / 1e6),
                ("collectives per step", lambda r: max(r["calls"])),
                ("MB sent (busiest rank)", lambda r: max(r["bytes_sent"]) / 1e6))
    fig, axes = _figure(3)
    for ax, (unit, measure) in zip(axes, measures):
        _ours_and_baseline(ax, ["\n".join(textwrap.wrap(n, 12)) for n in names], [measure(rows[n]) for n in names])
        ax.set_title(unit, fontsize=7)
    args = data["args"]
    _title(fig, f"bench_megatron_fsdp: Megatron-FSDP v1, FSDP {args['world']}, {args['layers']} blocks of hidden "
                f"{args['hidden']}: exact counts per step, ours (home) against all-gather-and-duplicate")
    return fig


def plot_local_gram(data: dict[str, Any]) -> Figure:
    """bench_local_gram: per coefficient set, the worst score over the battery with the default restarts, and
    without restarts on the same inputs (the JSON keeps each kind's worst input for the default; score = Gram error
    / max(2 x plain error, floor), <= 1 is issue 30's bound); non-finite drawn at the top."""
    rows, floor = data["rows"], data["floor"]
    sets = list(dict.fromkeys(r["coefficients"] for r in rows))

    def worst(name: str, key: str) -> float:
        scores = [r[key] / max(2 * r["plain"], floor) for r in rows if r["coefficients"] == name]
        return max(scores) if all(math.isfinite(v) for v in scores) else math.inf

    bare, default = [worst(n, "gram_no_restarts") for n in sets], [worst(n, "gram") for n in sets]
    top = 10 * max([v for v in bare + default if math.isfinite(v)] + [10.0])
    fig, (ax,) = _figure()
    restarts = {r["coefficients"]: tuple(r["restarts"]) for r in rows}
    labels = [f"{n if len(n) < 14 else n.replace('_', chr(10), 1)}\n{restarts[n]}" for n in sets]
    _bars(ax, labels, {"no restarts": [min(v, top) for v in bare], "default restarts": default}, values="%.2g")
    _baseline(ax, "the bound (score 1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-2, top * 3)
    ax.set_ylabel("worst score over the battery (log)", fontsize=7)
    _legend(ax, loc="upper right")
    _title(fig, f"bench_local_gram: the one-device Gram recursion against the plain iteration, {data['dtype']}, "
                f"k in {data['ks']}, aspects {data['aspects']}", [f"torch {data['torch']}"])
    return fig


PLOTTERS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "bench_ns": plot_ns,
    "bench_optimizer_step": plot_optimizer_step,
    "bench_host": plot_host,
    "bench_overlap": plot_overlap,
    "bench_megatron": plot_megatron,
    "bench_dion": plot_dion,
    "bench_hsdp": plot_hsdp,
    "bench_hsdp_experts": plot_hsdp_experts,
    "bench_grid": plot_grid,
    "bench_megatron_fsdp": plot_megatron_fsdp,
    "bench_local_gram": plot_local_gram,
}


def plot_file(path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Plot one bench_X.json into ``out_dir/bench_X.png``; a JSON with no plotter is a ValueError naming it."""
    if path.stem not in PLOTTERS:
        raise ValueError(f"{path}: no plotter for {path.stem!r} in scripts/plot_benchmarks.py (PLOTTERS)")
    fig = PLOTTERS[path.stem](json.loads(path.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=DPI)
    return out


def plot_all(docs: pathlib.Path, only: Sequence[str] = (), out_dir: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Plot every ``docs/bench_*.json`` (or those named in ``only``) into ``out_dir`` (``docs/plots``)."""
    paths = sorted(docs.glob("bench_*.json"))
    missing = sorted(set(only) - {p.stem for p in paths})
    if missing:
        raise ValueError(f"--only: no {', '.join(f'{docs}/{m}.json' for m in missing)}")
    chosen = [p for p in paths if not only or p.stem in only]
    unplotted = [str(p) for p in chosen if p.stem not in PLOTTERS]
    if unplotted:
        raise ValueError(f"no plotter in scripts/plot_benchmarks.py (PLOTTERS) for {', '.join(unplotted)}")
    return [plot_file(p, out_dir or docs / "plots") for p in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=pathlib.Path, default=pathlib.Path("docs"), help="where the bench_*.json are")
    parser.add_argument("--only", nargs="+", default=[], metavar="STEM", help="plot these JSONs only (bench_ns ...)")
    args = parser.parse_args()
    for out in plot_all(args.docs, args.only):
        print(f"{out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
