"""PNG plots of the benchmark results (matplotlib, from the ``bench`` extra)."""
from __future__ import annotations

from pathlib import Path


def _wrap(label: str, width: int = 18) -> str:
    """A long setup label on lines of about ``width`` characters, broken at spaces."""
    lines, line = [], ""
    for word in label.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def plot_dual_masking(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in result["rows"] if x["status"] == "ok"]
    cells = list(dict.fromkeys((x["setup"]["label"], x["masking"]) for x in rows))
    impls = list(dict.fromkeys(x["impl"] for x in rows))
    # the two panels one above the other, each as wide as its groups of bars need (~1.1 inch a
    # group); labels slant past 4 groups, so neighbours never overlap
    fig, axes = plt.subplots(2, 1, figsize=(min(max(8, 1.1 * len(cells) + 2), 24), 9))
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
        labels = [f"{_wrap(s)}\n{m}" for s, m in cells]
        if len(cells) > 4:  # many groups: slanted, anchored at the group, so neighbours never overlap
            ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right", rotation_mode="anchor")
        else:
            ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # headroom: the legend sits above the bars
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=len(impls), loc="upper center")
    info = result["device"]
    smoke = result["config"].get("smoke")
    fig.suptitle(("SMOKE RUN (toy sizes, code paths only: not a measurement) | " if smoke else "")
                 + f"{info['name']} | torch {info['torch']} | {result['config']['dtype']} | "
                 f"{result['created'][:10]}", fontsize=9, color="firebrick" if smoke else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
