"""PNG plots of the benchmark results (matplotlib, from the ``bench`` extra)."""
from __future__ import annotations

from pathlib import Path


def plot_dual_masking(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in result["rows"] if x["status"] == "ok"]
    cells = list(dict.fromkeys((x["setup"]["label"], x["masking"]) for x in rows))
    impls = list(dict.fromkeys(x["impl"] for x in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cells) + 4), 4.5))
    width = 0.8 / max(1, len(impls))
    # Interleaved (CPU) rows share one process, so their peaks coincide: plot what each step
    # saves for backward instead. Sequential (GPU) rows: each implementation's own peak.
    saved = any(x.get("timing") == "interleaved" for x in rows)
    mem_key = "saved_act_per_clip_bytes" if saved else "peak_mem_bytes"
    mem_title = ("saved for backward (MiB/clip, lower is better)" if saved
                 else "peak memory (MiB, lower is better)")
    for j, impl in enumerate(impls):
        by = {(x["setup"]["label"], x["masking"]): x for x in rows if x["impl"] == impl}
        xs = [i + j * width for i in range(len(cells))]
        axes[0].bar(xs, [by[c]["clips_per_s"] if c in by else 0 for c in cells], width, label=impl)
        mem = [(by[c].get(mem_key) or 0) / 2**20 if c in by else 0 for c in cells]
        axes[1].bar(xs, mem, width, label=impl)
    ticks = [i + 0.4 - width / 2 for i in range(len(cells))]
    for ax, title in zip(axes, ("train-step throughput (clips/s, higher is better)",
                                mem_title)):
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{s}\n{m}" for s, m in cells], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    info = result["device"]
    fig.suptitle(f"{info['name']} | torch {info['torch']} | {result['config']['dtype']} | "
                 f"{result['created'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
