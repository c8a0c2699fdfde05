"""What a GPU check reports: every GPU goal met, missed or not run (with why), judged from the
parts' results, and the Markdown summary written beside the JSON."""
from __future__ import annotations

from .parts import NEAR_COPY_BW

# Where the exact count and max_memory_allocated count as equal: the allocator rounds every
# block up to 512 bytes and holds what no tensor is (cuBLAS workspaces, kernels' scratch).
EXACT_MEMORY_TOLERANCE = 0.01

# (key, the goal as the issue states it, the part that measures it)
GOALS = (
    ("speedup_vs_reference", ">= 2x the reference's clips/s (ViT-B 16x224 b32, dual 0.9/0.5, bf16)",
     "dual_masking_vit_b"),
    ("mem_vs_reference", "<= 1/2 the reference's peak memory (the same row)", "dual_masking_vit_b"),
    ("mfu", ">= 45% MFU on an H100 (the same row, model FLOPs over the datasheet bf16 dense peak)",
     "dual_masking_vit_b"),
    ("speedup_dual_vs_enc", ">= 1.79x dual masking over encoder-only (ViT-B, as the paper's Table 2)",
     "dual_masking_vit_b"),
    ("kernels_near_hbm", f"fused kernels near HBM bandwidth: every fused op >= {NEAR_COPY_BW:.0%} of the measured "
                         "device copy bandwidth", "kernels"),
    ("exact_memory", f"the exact memory count equals torch.cuda.max_memory_allocated of the same step "
                     f"(within {EXACT_MEMORY_TOLERANCE:.0%}, less what the allocator held before the step "
                     "beyond the counted tensors)", "memory_count"),
)
_FMT = {"speedup_vs_reference": "{:.2f}x", "mem_vs_reference": "{:.2f}", "mfu": "{:.1%}",
        "speedup_dual_vs_enc": "{:.2f}x"}


def _not_run(why: str) -> dict:
    return {"status": "not run", "value": None, "reason": why}


def _judge(key: str, part: dict, gpu: bool) -> dict:
    if not gpu:
        return _not_run("a GPU goal; this run is on the CPU (--dry-run: toy sizes)")
    if part is None:
        return _not_run("its part was not in this run (--parts)")
    if part["status"] not in ("ok", "failed"):
        return _not_run(f"its part did not finish: {part['status']}" + (f" ({part['reason']})" if part["reason"] else ""))
    d = part["data"]
    if key == "kernels_near_hbm":
        ran = [r for r in d["rows"] if r["variant"].startswith("fused") and r["ok"]]
        if not ran:
            why = next((r["why"] for r in d["rows"] if r["variant"].startswith("fused")), "no fused rows")
            return _not_run(f"no fused kernel ran here: {why}")
        worst = min(ran, key=lambda r: r["of_copy_bw"])
        value = (f"slowest {worst['op']} ({worst['setup']}) at {worst['gbps']:.0f} GB/s = {worst['of_copy_bw']:.0%} of "
                 f"copy" + (f", {worst['of_hbm_datasheet']:.0%} of datasheet HBM" if worst.get("of_hbm_datasheet") else ""))
        return {"status": "met" if worst["of_copy_bw"] >= NEAR_COPY_BW else "missed", "value": value, "reason": None}
    if key == "exact_memory":
        if d.get("cuda_max_allocated_bytes") is None:
            return _not_run(f"no CUDA allocator to compare with ({d['summary']})")
        rel = d["relative_difference"]
        return {"status": "met" if abs(rel) <= EXACT_MEMORY_TOLERANCE else "missed", "value": d["summary"],
                "reason": None}
    g = d["goals"]
    if not g.get("applicable"):
        return _not_run(g["why"])
    ok, value = g["pass"][key], g[key]
    if ok is None:
        why = (f"the goal is for an H100-class GPU" if key == "mfu" and g.get("goal_mfu") is None
               else "the row has no value for it")
        return _not_run(why + (f" (measured {_FMT[key].format(value)})" if value is not None else ""))
    return {"status": "met" if ok else "missed", "value": _FMT[key].format(value), "reason": None}


def judge_goals(parts: dict[str, dict], gpu: bool) -> list[dict]:
    """Every goal of ``GOALS``: ``{"goal", "what", "part", "status": met | missed | not run, "value",
    "reason"}``; on a CPU (``gpu`` False) none is judged."""
    return [{"goal": key, "what": what, "part": part, **_judge(key, parts.get(part), gpu)} for key, what, part in GOALS]


def markdown(result: dict) -> str:
    info, est = result["device"], result["estimate"]
    head = "GPU check DRY RUN (toy sizes on the CPU: the code paths, not the numbers)" if result["dry_run"] \
        else f"GPU check: {info['name']}"
    lines = [f"## {head}", "",
             f"{result['created']}, commit {info['git_commit']}, torch {info['torch']}, CUDA {info['cuda']}, "
             f"wall {result['wall_s']:.0f} s (budget {est['budget_s']:.0f} s on an H100)", "",
             "### GPU goals", "", "| goal | status | value | why not judged |", "|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(f"| {g['what']} | **{g['status']}** | {g['value'] or '–'} | {g['reason'] or ''} |")
    lines += ["", "### Parts", "", "| part | status | seconds (share) | estimate on H100 | result |",
              "|---|---|---|---|---|"]
    for name, p in result["parts"].items():
        e = est["parts"][name]["estimate_s"]
        note = p["reason"] or p["data"].get("summary", "")
        if p["status"] not in ("ok", "not run") and p["data"].get("summary"):
            note += f" ({p['data']['summary']})"
        lines.append(f"| {name} | {p['status']} | {p['seconds']:.1f} ({p['share_s']:.0f}) | {e:.0f} s | "
                     f"{str(note).replace('|', '/')[:300]} |")
    lines += ["", f"H100 estimate of the full plan: **{est['total_s']:.0f} s** (budget {est['budget_s']:.0f} s; time "
                  f"shares {est['shares_total_s']:.0f} s with start-up): device work from exact FLOPs and bytes "
                  f"at {est['rates']} x safety factor {est['safety_factor']:.0f}, plus each part's host time "
                  "(assumed; see the JSON's estimate.parts.*.host_why)"]
    if result.get("estimate_this_device"):
        lines.append(f"Estimate at this device's datasheet rates: {result['estimate_this_device']['total_s']:.0f} s")
    return "\n".join(lines) + "\n"
