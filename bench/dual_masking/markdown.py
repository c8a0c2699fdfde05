"""The Markdown a run prints: every cell, the paper's Table 2 beside ours, vmae_fast against the
official computation, and the GPU goals."""
from __future__ import annotations

from .metrics import PAPER, find_row


# What a --smoke run is: the code paths at toy sizes. Its tables say so where a reader looks.
SMOKE = "SMOKE RUN: toy sizes, code paths only; no number here is a measurement"


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def _x(v, fmt="{:.2f}x") -> str:
    return "–" if v is None else fmt.format(v)


def _load(v) -> str:
    return "n/a" if not v else f"{v[0]:.1f}"


def _heading(result: dict) -> list[str]:
    info, config, ceiling = result["device"], result["config"], result["matmul_ceiling"]
    out = [f"## Dual masking benchmark: {info['name']}" + (f" ({SMOKE})" if config.get("smoke") else ""),
           f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit {info['git_commit']}, "
           f"dtype {config['dtype']}, native ext: {info['native_ext'].split(' (')[0]}, "
           f"step = {config['optimizer']}, median of {config['repeats']} "
           f"after {config['warmup']} warm-up",
           f"matmul ceiling: {ceiling['tflops']:.2f} TFLOP/s ({ceiling['dtype']} {ceiling['n']}^3)"
           + (f"; datasheet bf16 dense peak {info['bf16_dense_peak_tflops']:.0f} TFLOP/s"
              if info.get("bf16_dense_peak_tflops") else ""),
           f"timing: {config['timing']}; machine load average at start/end: "
           f"{_load(result['loadavg']['start'])} / {_load(result['loadavg']['end'])} "
           f"({info.get('cpu_count')} CPUs)"]
    if any(x.get("timing") == "interleaved" for x in result["rows"]):
        out.append("CPU memory: peak = the process's RSS high-water mark (all implementations alive), "
                   "act/clip = what one train step adds to it, per clip (rough); saved/clip = bytes autograd "
                   "saves for backward per clip (exact)")
    return out


def _cell_line(x: dict) -> str:
    head = (f"| {x['setup']['label']} | {x['masking']} | {x['impl']} | {x['params'] / 1e6:.1f}M | "
            f"{x['gmacs_official']:.2f} / {x['gmacs_vmae_fast']:.2f} | ")
    if x["status"] != "ok":
        return head + f"**{x['status']}**: {x.get('error', '')[:80]} |" + " |" * 10
    s = x["step_s"]
    mb = x.get("max_batch")
    mbs = "–" if mb is None else (f"{mb['max_batch']}{'+' if mb.get('capped') else ''}"
                                  if mb.get("max_batch") is not None else "n/a")
    mfu, hfu = (f"{_x(x[k + '_datasheet'], '{:.0%}')} / {_x(x[k + '_measured_ceiling'], '{:.0%}')}"
                for k in ("mfu", "hfu"))
    return (head + f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}–{s['max'] * 1e3:.1f}) | "
            f"{x['clips_per_s']:.2f} | {_x(x['achieved_tflops'], '{:.2f}')} | {mfu} | {hfu} | "
            f"{_mb(x['peak_mem_bytes'])} | {_mb(x['act_mem_per_clip_bytes'])} | "
            f"{_mb(x.get('saved_act_per_clip_bytes'))} | {mbs} | "
            f"{_x(x['speedup_dual_vs_enc'])} | {_x(x['speedup_vs_reference'])} |")


def _cells(rows: list[dict]) -> list[str]:
    return ["", "| setup | masking | impl | params | GMACs official / ours | step ms median (min–max) | clips/s "
            "| TFLOP/s hw | MFU peak / ceiling | HFU peak / ceiling | peak mem | act/clip | saved/clip | max batch "
            "| dual÷enc | vs reference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + [_cell_line(x) for x in rows]


def _paper_table(rows: list[dict]) -> list[str]:
    """One line per setup and masking; the paper's numbers only where the setup is the paper's."""
    out = ["", "### Beside the paper's Table 2 (forward GMACs per clip; speedup = time ratio of encoder-only "
           "to dual masking)", "",
           "| model | masking | paper GFLOPs | ours, official conv. | ours, vmae_fast conv. | paper speedup "
           "| speedup vmae_fast | speedup reference | paper Mems | peak mem vmae_fast | peak mem reference |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    firsts: dict[tuple, dict] = {}
    for x in rows:
        firsts.setdefault((x["setup"]["label"], x["decoder_ratio"]), x)
    for key, x in firsts.items():
        s = x["setup"]
        paper = PAPER.get((x["arch"], x["decoder_ratio"]), {}) \
            if (s["frames"], s["img_size"], s["depth"], s["decoder_depth"], x["encoder_ratio"]) == (16, 224, None, 4, 0.9) else {}
        fast = find_row(rows, key[0], key[1], "vmae_fast") or {}
        ref = find_row(rows, key[0], key[1], "reference") or {}
        out.append(f"| {s['label']} | {x['masking']} | {paper.get('gmacs', '–')} | {x['gmacs_official']:.2f} | "
                   f"{x['gmacs_vmae_fast']:.2f} | {_x(paper.get('speedup'))} | {_x(fast.get('speedup_dual_vs_enc'))} | "
                   f"{_x(ref.get('speedup_dual_vs_enc'))} | {paper.get('mems', '–')} | "
                   f"{_mb(fast.get('peak_mem_bytes'))} | {_mb(ref.get('peak_mem_bytes'))} |")
    return out


def _vs_reference(rows: list[dict], smoke: bool = False) -> list[str]:
    out = ["", "### vmae_fast against the official computation (same weights, masks, dtype)"
           + (f" ({SMOKE})" if smoke else ""), ""]
    bold = "" if smoke else "**"  # a toy-size timing is no speedup to stress
    for x in rows:
        ref = x["impl"] == "vmae_fast" and find_row(rows, x["setup"]["label"], x["decoder_ratio"], "reference")
        if x["status"] != "ok" or not ref:
            continue
        dl = abs(x["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        out.append(f"- {x['setup']['label']}, {x['masking']}: reference {ref['step_s']['median'] * 1e3:.1f} ms, "
                   f"vmae_fast {x['step_s']['median'] * 1e3:.1f} ms -> {bold}{x['speedup_vs_reference']:.2f}x{bold} "
                   f"on medians, {x['speedup_vs_reference_min']:.2f}x on the fastest steps "
                   f"({ref['step_s']['min'] * 1e3:.1f} / {x['step_s']['min'] * 1e3:.1f} ms) "
                   f"({'saved activation' if x['mem_vs_reference_basis'].startswith('saved') else 'peak'} memory "
                   f"{_x(x['mem_vs_reference'], '{:.2f}')} of reference; loss rel. diff {dl:.1e})")
    return out


def _goals(g: dict) -> list[str]:
    out = ["", "### GPU goals (ViT-B 16x224, dual 0.9/0.5, bf16)", ""]
    if not g.get("applicable"):
        return out + [f"- not judged: {g['why']}"]
    for k, label, fmt in (("speedup_vs_reference", ">= 2x clips/s of reference", "{:.2f}x"),
                          ("mem_vs_reference", "<= 0.5 of reference peak memory", "{:.2f}"),
                          ("mfu", ">= 45% MFU (H100-class)", "{:.1%}"),
                          ("speedup_dual_vs_enc", ">= 1.79x dual over encoder-only", "{:.2f}x")):
        ok = g["pass"][k]
        out.append(f"- {label}: {_x(g[k], fmt)} -> {'PASS' if ok else ('FAIL' if ok is False else 'n/a')}")
    return out


def _notes(rows: list[dict]) -> list[str]:
    out = ["", "MFU: model FLOPs (forward + backward of the vmae_fast row, no recomputation) per second; "
           "HFU: hardware FLOPs (what the row's step ran, activation-checkpointing recomputation included); "
           "peak = datasheet bf16 dense peak, ceiling = the measured matmul ceiling; max batch N+ = the search "
           "stopped at its cap"]
    missed = sorted({op for x in rows for op in x.get("flop_counter_missed") or ()})
    if missed:
        out.append(f"torch.utils.flop_counter counted 0 FLOPs for {', '.join(missed)}: filled in from the "
                   "q/k/v shapes by the analytic rule (vmae_fast.flops.attention_flops)")
    return out


def render(result: dict) -> str:
    rows = result["rows"]
    return "\n".join(_heading(result) + _cells(rows) + _paper_table(rows)
                     + _vs_reference(rows, bool(result["config"].get("smoke")))
                     + _goals(result["goals"]) + _notes(rows))

