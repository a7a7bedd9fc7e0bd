"""Published figures the planner is checked against, with the setting assumed for each.

Megatron-LM issue #6676 (layer-sharded Muon): 32 GB300, TP 2 x generalized-TP remat 8 (one Newton-Schulz
domain of 16 ranks for dense weights), EP 8 x expert TP 2; "production matrix shapes" are not published.
Optimizer step: duplicated 632 ms, distributed 356 ms, layer-sharded 157 ms; NCCL calls per step 76
(duplicated) / 276 (distributed) -> 4 (layer-sharded). Its PR #6683: 264 -> 139 ms (setting not stated;
only the ratio is compared).

Assumptions (ours, stated in docs/scale.md): the model is Qwen3-30B-A3B's shape (hidden 2048, 48 layers,
32 heads in 4 query groups of 128 channels, 128 experts of 768 with SwiGLU, every layer MoE) - an MoE whose
many same-shaped expert weights match the issue's description; the dense domain is tp = 16 (TP x GTP),
dp = 2 (and, in one more row, the real layout: TP 2 with GTP 8 pieces, EP 8 with EGTP 2 pieces, LAYOUT_6676_GTP); upstream's duplicated and distributed modes issue one set of collectives per matrix (our
"/per-matrix" anchors); layer-sharded is our home mode (one fused all-to-all each way per domain);
Newton-Schulz in bf16 (fp32_matmul_prec "medium", Megatron's default), 5 quintic steps, one fused buffer per
collective (no 256 MiB buckets, as upstream fuses); the built-in GB300
profile unchanged. Every DP replica runs the same work in all three, so "replicated" rows are compared.
"""

from __future__ import annotations

from dist_ortho.plan.devices import PROFILES
from dist_ortho.plan.estimate import Layout, Settings, estimate
from dist_ortho.plan.models import preset

ISSUE_6676 = {"duplicated/per-matrix": (632.0, 76), "distributed/per-matrix": (356.0, 276), "home": (157.0, 4)}
PR_6683_RATIO = 264.0 / 139.0
ISSUE_6719_STALL = 0.17  # Megatron-LM issue 6719: ~17% of the layer-sharded optimizer step stalled in NCCL
LAYOUT_6676 = Layout(tp=16, dp=2, ep=8, etp=2)
# the same 32 ranks as Megatron GTP lays them out: dense TP 2 with each TP block in 8 GTP pieces over DP ranks,
# experts EP 8 (expert TP 1) with each expert in 2 expert-GTP pieces; dist_ortho gathers a block's pieces on one
# owner rank of its GTP group (tests/test_layouts.py, tests/test_megatron_gtp.py)
LAYOUT_6676_GTP = Layout(tp=2, dp=16, ep=8, etp=1, gtp=8, egtp=2)


def compare_6676() -> list[dict]:
    """Rows of predicted vs published for issue #6676's setting (the assumptions in the module doc): upstream's
    three modes modelled as a step per weight (as upstream's loops run: the model's check against the published
    figures), then dist_ortho's grouped home step, with its host time, and captured in a CUDA graph."""
    def run(layout: Layout = LAYOUT_6676, **settings: bool) -> dict[str, object]:
        rows = estimate(preset("qwen3-30b-a3b"), layout, PROFILES["GB300"],
                        Settings(precision="medium", bucket_bytes=2**62, **settings),
                        modes=list(ISSUE_6676), arrangements=("replicated",))
        return {r.mode: r for r in rows}

    upstream = run(grouped=False)
    home = upstream["home"].seconds
    out = []
    for mode, (ms, calls) in ISSUE_6676.items():
        r = upstream[mode]
        out.append({"upstream mode": {"home": "layer-sharded"}.get(mode, mode.split("/")[0]), "dist_ortho mode": mode,
                    "published ms": ms, "predicted ms": 1e3 * r.seconds, "published vs layer-sharded": ms / ISSUE_6676["home"][0],
                    "predicted vs layer-sharded": r.seconds / home, "published calls": calls, "predicted calls": r.calls})
    for label, settings in (("home, grouped step", {}), ("home, grouped step, CUDA graph", {"capture": True}),
                            ("home, grouped step, the real TP 2 x GTP 8 / EP 8 x EGTP 2 layout",
                             {"layout": LAYOUT_6676_GTP})):
        r = run(**settings)["home"]
        out.append({"upstream mode": "-", "dist_ortho mode": label, "published ms": None, "predicted ms": 1e3 * r.seconds,
                    "published vs layer-sharded": None, "predicted vs layer-sharded": r.seconds / home,
                    "published calls": None, "predicted calls": r.calls})
    return out


def compare_overlap_6676() -> list[dict]:
    """The 6676 setting's step with its exposed communication: upstream's layer-sharded step (against issue
    6719's ~17% stalled in NCCL), and dist_ortho's home step on the DP x TP grid (each weight once in the grid,
    then the share over DP) without and with ``overlap=True`` (the share taken as hidden under the next forward,
    the TP collectives of the pipelined Newton-Schulz partly under its compute: dist_ortho.plan.estimate)."""
    def run(arrangement: str, **settings: bool):
        return estimate(preset("qwen3-30b-a3b"), LAYOUT_6676, PROFILES["GB300"],
                        Settings(precision="medium", bucket_bytes=2**62, **settings), modes=["home"],
                        arrangements=(arrangement,))[0]

    rows = [("upstream layer-sharded (step per weight)", run("replicated", grouped=False), ISSUE_6719_STALL),
            ("dist_ortho home, grid", run("grid"), None), ("dist_ortho home, grid, overlap=True", run("grid", overlap=True), None)]
    return [{"step": label, "predicted ms": 1e3 * r.seconds, "exposed comm ms": 1e3 * r.comm_seconds,
             "exposed comm share": r.comm_seconds / r.seconds, "published stall share": published}
            for label, r, published in rows]
