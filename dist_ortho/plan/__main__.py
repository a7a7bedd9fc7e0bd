"""python -m dist_ortho.plan: predict the Muon optimizer step of a model on a cluster, per TP mode.

    python -m dist_ortho.plan --model llama3-70b --device H100 --tp 8 --dp 64
    python -m dist_ortho.plan --hf-config config.json --device GB300 --tp 4 --dp 16 --ep 8 --json
    python -m dist_ortho.plan --megatron-args "--hidden-size 4096 --num-layers 32 ..." --dp 8 --png scale.png
    python -m dist_ortho.plan --calibrate --out cpu.json       (fit the CPU profile here, ~20 s)
    python -m dist_ortho.plan --published                      (Megatron-LM #6676, predicted vs published)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence

from dist_ortho.plan.devices import PROFILES, DeviceProfile, load_profile
from dist_ortho.plan.estimate import Estimate, Layout, Settings, estimate
from dist_ortho.plan.models import PRESETS, ModelSpec, from_hf_config, from_megatron_args, preset

WORLDS = [2**k for k in range(3, 13)]  # 8 .. 4096


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_ortho.plan", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="llama3-8b", help=f"a preset: {', '.join(sorted(PRESETS))}")
    src.add_argument("--hf-config", help="a Hugging Face config.json (read as plain JSON)")
    src.add_argument("--megatron-args", help="a Megatron-LM argument string (model and parallel sizes)")
    for name in ("hidden", "layers", "heads", "query-groups", "ffn", "experts", "expert-ffn"):
        p.add_argument(f"--{name}", type=int, help=f"override the model's {name}")
    p.add_argument("--device", default="H100", help=f"{', '.join(PROFILES)} or a JSON file of DeviceProfile fields")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a device profile field")
    p.add_argument("--tp", type=int)
    p.add_argument("--dp", type=int)
    p.add_argument("--ep", type=int)
    p.add_argument("--etp", type=int, help="expert TP size (default: tp)")
    p.add_argument("--pp", type=int)
    p.add_argument("--gtp", type=int, help="Megatron GTP weight remat: dense TP blocks in this many pieces over DP ranks")
    p.add_argument("--egtp", type=int, help="Megatron GTP weight remat of the experts (expt_gtp_remat)")
    p.add_argument("--precision", default="medium", choices=["highest", "high", "medium"],
                   help="fp32_matmul_prec: medium runs Newton-Schulz in bf16")
    p.add_argument("--ns-dtype", choices=["bf16", "fp16", "fp32"], help="the optimizer's ns_dtype (overrides --precision's dtype)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--coefficients", default="quintic")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--png", help="plot predicted step time against world size 8..4096 (tp and pp kept) to this file")
    p.add_argument("--calibrate", action="store_true", help="fit the CPU profile on this machine (~20 s)")
    p.add_argument("--out", help="with --calibrate: write the fitted profile as JSON here")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="with --calibrate: the world sizes to probe (1 is needed)")
    p.add_argument("--calibrate-device", default="cpu", choices=["cpu", "cuda"],
                   help="with --calibrate: cuda fits this GPU (matmul rates, memory bandwidth, launch and host time; "
                        "links from --device)")
    p.add_argument("--capture", action="store_true", help="the step captured in a CUDA graph (capturable=True)")
    p.add_argument("--overlap", action="store_true", help="overlap=True: the grid's share over DP hidden under the next forward, the TP collectives pipelined")
    p.add_argument("--published", action="store_true", help="Megatron-LM issue 6676: predicted vs published")
    return p


def _model(a: argparse.Namespace) -> tuple[ModelSpec, dict]:
    layout: dict = {}
    if a.hf_config:
        model = from_hf_config(a.hf_config)
    elif a.megatron_args:
        model, meg = from_megatron_args(shlex.split(a.megatron_args))
        layout = {"tp": meg.tp, "pp": meg.pp, "ep": meg.ep, "etp": meg.etp, "dp": meg.dp}
    else:
        model = preset(a.model)
    changes = {f: getattr(a, f) for f in ("hidden", "layers", "heads", "query_groups", "ffn", "experts", "expert_ffn")
               if getattr(a, f) is not None}
    return (dataclasses.replace(model, **changes) if changes else model), layout


def _overrides(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set: expected FIELD=VALUE, got {pair!r}")
        out[field] = json.loads(value) if value[:1] in "{[" else (value if field == "name" else float(value))
    return out


def table(model: ModelSpec, layout: Layout, profile: DeviceProfile, rows: Sequence[Estimate]) -> str:
    base = next(r.seconds for r in rows if (r.arrangement, r.mode) == ("replicated", "duplicated"))
    lines = [f"{model.name}: hidden {model.hidden}, {model.layers} layers, {model.heads} heads / {model.query_groups} groups, "
             f"ffn {model.ffn}" + (f", {model.experts} experts of {model.expert_ffn}" if model.experts else ""),
             (f"layout: tp {layout.tp} x dp {layout.dp} x pp {layout.pp} = {layout.world} ranks"
              + (f"; experts: ep {layout.ep} x expert tp {layout.expert_tp} x expert dp {layout.expert_dp}" if model.experts else "")
              + f"; device {profile.name}"),
             "| arrangement | mode | NS GFLOP / rank | MB sent / rank | collectives / step | Muon state MiB / rank "
             "| predicted ms | of which communication | vs replicated duplicated |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "grid (layer-wise)" if (r.arrangement, r.mode) == ("grid", "duplicated") else r.arrangement
        lines.append(f"| {label} | {r.mode} | {r.flops / 1e9:.2f} | {r.bytes / 1e6:.1f} | {r.calls} | {r.state_bytes / 2**20:.0f} "
                     f"| {1e3 * r.seconds:.1f} | {1e3 * r.comm_seconds:.1f} | {base / r.seconds:.2f}x |")
    best = min(rows, key=lambda r: r.seconds)
    for r in rows:
        if r.mode == "auto":
            lines.append(f"auto ({r.arrangement}) runs: " + ", ".join(f"{n} matrices {m}" for m, n in sorted(r.chosen.items())))
    lines.append(f"fastest predicted: {best.arrangement} / {best.mode} ({1e3 * best.seconds:.1f} ms)")
    return "\n".join(lines)


def plot(model: ModelSpec, layout: Layout, profile: DeviceProfile, settings: Settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for world in WORLDS:
        if world % (layout.tp * layout.pp):
            continue
        try:
            at = dataclasses.replace(layout, dp=world // (layout.tp * layout.pp))
            rows = estimate(model, at, profile, settings)
        except ValueError:
            continue
        for r in rows:
            series.setdefault(f"{r.arrangement} / {r.mode}", []).append((world, 1e3 * r.seconds))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        ax.plot(*zip(*points), marker="o", linestyle="--" if label.startswith("replicated") else "-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="world size (GPUs)", ylabel="predicted optimizer step (ms)",
           title=f"{model.name}, tp {layout.tp}, pp {layout.pp}, {profile.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.calibrate:
            from dist_ortho.plan.calibrate import fit, fit_cuda, measure, measure_cuda

            if a.calibrate_device == "cuda":
                measured = {1: measure_cuda()}
                profile = fit_cuda(measured[1], load_profile(a.device))
            else:
                if 1 not in a.worlds or min(a.worlds) < 1:
                    raise ValueError(f"--worlds: positive world sizes including 1, got {a.worlds}")
                measured = measure(tuple(sorted(set(a.worlds))))
                profile = fit(measured)
            text = json.dumps(dataclasses.asdict(profile), indent=1)
            print("measured per world size:", json.dumps({str(k): v for k, v in sorted(measured.items())}))
            print(text)
            if a.out:
                with open(a.out, "w") as f:
                    f.write(text)
            return 0
        if a.published:
            from dist_ortho.plan.published import PR_6683_RATIO, compare_6676, compare_overlap_6676

            rows, overlap = compare_6676(), compare_overlap_6676()
            if a.json:
                print(json.dumps({"issue_6676": rows, "pr_6683_published_ratio": PR_6683_RATIO,
                                  "overlap_6676": overlap}, indent=1))
                return 0
            for published in (rows, overlap):
                keys = list(published[0])
                print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
                for r in published:
                    print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else "-" if v is None else str(v)
                                            for v in r.values()) + " |")
                if published is rows:
                    print(f"PR 6683 (setting not published): {PR_6683_RATIO:.2f}x faster\n")
            return 0
        model, meg = _model(a)
        sizes = {k: v for k, v in {"tp": a.tp, "dp": a.dp, "ep": a.ep, "etp": a.etp, "pp": a.pp, "gtp": a.gtp,
                                   "egtp": a.egtp}.items() if v is not None}
        layout = Layout(**{"tp": 1, "dp": 1, **{k: v for k, v in meg.items() if v is not None}, **sizes})
        profile = load_profile(a.device, _overrides(a.set))
        settings = Settings(steps=a.steps, coefficient_type=a.coefficients, precision=a.precision, capture=a.capture,
                            overlap=a.overlap, ns_dtype=a.ns_dtype)
        rows = estimate(model, layout, profile, settings)
        if a.json:
            print(json.dumps({"model": dataclasses.asdict(model), "layout": dataclasses.asdict(layout),
                              "device": dataclasses.asdict(profile), "settings": dataclasses.asdict(settings),
                              "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
        else:
            print(table(model, layout, profile, rows))
        if a.png:
            plot(model, layout, profile, settings, a.png)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
