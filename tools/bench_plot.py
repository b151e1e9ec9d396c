"""`csprt bench --plot`: one PNG from a bench report (matplotlib, headless).

Panels: latency per stage for each (schedule, backend) as stacked bars; LLM speedup vs `full` against
the LLM FLOPs reduction, with the FLOPs bound 1 / (1 - r); and, when measured, latency vs image tokens
and vs text length.
"""

from __future__ import annotations

from pathlib import Path

from graphs.atomic import atomic_path

STAGE_ORDER = ("preprocess", "vision", "sam_encoder", "llm", "llm_decode", "seg_head", "sam_decoder", "postprocess")


def plot_report(report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt

    panels = 2 + bool(report["scaling"])
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5))
    _stage_bars(axes[0], report)
    _speedup_vs_flops(axes[1], report)
    if report["scaling"]:
        _scaling(axes[2], report)
    cfg = report["config"]
    fig.suptitle(f"csprt bench: {cfg['source']}, {cfg['precision']}, {cfg['mode']}, {cfg['device']}"
                 f"{' (' + report['machine']['gpu'] + ')' if report['machine'].get('gpu') else ''}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def _stage_bars(ax, report: dict) -> None:
    records = report["records"]
    labels = [f"{r['schedule']}\n{r['backend']}" + (f"\nb{r['batch']}" if r.get("batch", 1) != 1 else "")
              for r in records]
    bottoms = [0.0] * len(records)
    for stage in STAGE_ORDER:
        values = [r["spans_ms"].get(stage, {}).get("median", 0.0) for r in records]
        if any(values):
            ax.bar(labels, values, bottom=bottoms, label=stage)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("median latency (ms)")
    ax.set_title("latency per stage")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)


def _speedup_vs_flops(ax, report: dict) -> None:
    top = 0.0
    for backend, per in report["ratios"]["schedule_vs_full"].items():
        xs = [v["llm_flops_reduction_pct"] for v in per.values() if v["llm_speedup"] is not None]
        ys = [v["llm_speedup"] for v in per.values() if v["llm_speedup"] is not None]
        ax.scatter(xs, ys, label=backend)
        for name, v in per.items():
            if v["llm_speedup"] is not None:
                ax.annotate(name, (v["llm_flops_reduction_pct"], v["llm_speedup"]), fontsize=7)
        top = max([top, *xs])
    bound_x = [i * max(top, 10.0) / 50 for i in range(51)]
    ax.plot(bound_x, [100.0 / (100.0 - x) for x in bound_x], "k--", linewidth=0.8, label="FLOPs bound")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("LLM FLOPs reduction vs full (%)")
    ax.set_ylabel("LLM speedup vs full (same run)")
    ax.set_title("speedup vs FLOPs reduction")
    ax.legend(fontsize=7)


def _scaling(ax, report: dict) -> None:
    for axis, style in (("image_tokens", "-o"), ("text_tokens", "--s")):
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for p in report["scaling"]:
            if p["axis"] == axis:
                series.setdefault((p["schedule"], p["backend"]), []).append((p["value"], p["end_to_end_ms"]["median"]))
        for (sched, backend), pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=f"{sched}/{backend} vs {axis.split('_')[0]}")
    ax.set_xlabel("image tokens (-o) / text tokens (--s)")
    ax.set_ylabel("median end-to-end latency (ms)")
    ax.set_title("scaling")
    ax.legend(fontsize=6)
