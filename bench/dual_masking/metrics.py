"""The numbers derived from measured rows (TFLOP/s, MFU, HFU, speedups, memory ratios), and
the goals of the issue judged from them, beside the paper's Table 2."""
from __future__ import annotations

# docs/semantics.md §10: the paper's Table 2 (forward GMACs per 16x224 clip, fvcore convention),
# the decoder-ratio ablation, speedups of dual masking, and "Mems" (meaning undefined there).
PAPER = {
    ("vit_base_patch16_224", 0.0): {"gmacs": 35.48, "mems": "631M"},
    ("vit_base_patch16_224", 0.25): {"gmacs": 31.63},
    ("vit_base_patch16_224", 0.5): {"gmacs": 25.87, "mems": "328M", "speedup": 1.79},
    ("vit_base_patch16_224", 0.75): {"gmacs": 21.06},
    ("vit_giant_patch14_224", 0.0): {"gmacs": 263.93, "mems": "1753M"},
    ("vit_giant_patch14_224", 0.5): {"gmacs": 241.61, "mems": "1050M", "speedup": 1.48},
}
GOAL_SPEEDUP_VS_REF = 2.0
GOAL_MEM_FRACTION = 0.5
GOAL_MFU_HOPPER = 0.45


def find_row(rows: list[dict], setup_label: str, r: float, impl: str) -> dict | None:
    """The measured row of one cell and implementation, if any."""
    for x in rows:
        if x["setup"]["label"] == setup_label and x["decoder_ratio"] == r and x["impl"] == impl and x["status"] == "ok":
            return x
    return None


def derive(rows: list[dict], info: dict, ceiling: dict) -> None:
    """Add TFLOP/s, MFU, HFU and the two speedups to every measured row."""
    peak = info.get("bf16_dense_peak_tflops")
    for x in rows:
        if x["status"] != "ok":
            continue
        t = x["step_s"]["median"]
        # Hardware FLOPs: what this row's step ran, the forward of checkpointed blocks again in
        # backward included. Model FLOPs: the work the function needs (the vmae_fast row's
        # forward + backward without recomputation, the same for every implementation of the
        # cell), so MFU does not reward recomputing or computing what the function discards.
        hw = x.get("counted_flops_train_step")
        fast = find_row(rows, x["setup"]["label"], x["decoder_ratio"], "vmae_fast")
        model = (fast or {}).get("counted_flops_model_step") or x.get("counted_flops_model_step")
        x["hardware_flops_train_step"] = hw
        x["model_flops_train_step"] = model
        x["achieved_tflops"] = hw / t / 1e12 if hw else None
        x["model_tflops"] = model / t / 1e12 if model else None
        bf16_peak = peak if x["dtype"] != "float32" else None  # the datasheet peak is a bf16 number
        for kind, tf in (("mfu", x["model_tflops"]), ("hfu", x["achieved_tflops"])):
            x[f"{kind}_datasheet"] = tf / bf16_peak if (tf and bf16_peak) else None
            x[f"{kind}_measured_ceiling"] = tf / ceiling["tflops"] if tf else None
        enc = find_row(rows, x["setup"]["label"], 0.0, x["impl"])
        x["speedup_dual_vs_enc"] = enc["step_s"]["median"] / t if (enc and x["decoder_ratio"] != 0) else None
        ref = find_row(rows, x["setup"]["label"], x["decoder_ratio"], "reference")
        x["speedup_vs_reference"] = ref["step_s"]["median"] / t if ref else None
        # Interleaved rows share one process, so their peaks are the same number: compare the
        # activations each step saves for backward instead (exact, unlike an RSS delta).
        key = "saved_act_per_clip_bytes" if x.get("timing") == "interleaved" else "peak_mem_bytes"
        x["mem_vs_reference_basis"] = key
        ok = ref and (ref.get(key) or 0) > 0 and (x.get(key) or 0) > 0  # RSS deltas can read <= 0
        x["mem_vs_reference"] = x[key] / ref[key] if ok else None
        x["speedup_vs_reference_min"] = ref["step_s"]["min"] / x["step_s"]["min"] if ref else None


def goals(rows: list[dict], info: dict) -> dict:
    """The issue's GPU goals (ViT-B 16x224, dual 0.9/0.5, 1 GPU), judged from this run."""
    cand = [x for x in rows if x["status"] == "ok" and x["impl"] == "vmae_fast" and x["arch"] == "vit_base_patch16_224"
            and x["setup"]["frames"] == 16 and x["setup"]["img_size"] == 224 and x["decoder_ratio"] == 0.5
            and x["encoder_ratio"] == 0.9 and x["setup"]["depth"] is None and not x["setup"]["ckpt"]]
    if info["device_type"] != "cuda":
        return {"applicable": False, "why": "the goals are for a GPU with bf16; this run is on CPU"}
    if not cand:
        return {"applicable": False, "why": "no ok vmae_fast row of ViT-B 16x224 dual 0.9/0.5 without checkpointing"}
    x = cand[0]
    hopper = any(k in info.get("name", "") for k in ("H100", "H200"))
    out = {"applicable": True, "row": x["setup"]["label"],
           "speedup_vs_reference": x["speedup_vs_reference"], "goal_speedup_vs_reference": GOAL_SPEEDUP_VS_REF,
           "mem_vs_reference": x["mem_vs_reference"], "goal_mem_vs_reference": GOAL_MEM_FRACTION,
           "mfu": x["mfu_datasheet"], "goal_mfu": GOAL_MFU_HOPPER if hopper else None, "hfu": x["hfu_datasheet"],
           "speedup_dual_vs_enc": x["speedup_dual_vs_enc"], "goal_speedup_dual_vs_enc": PAPER[(x["arch"], 0.5)]["speedup"]}
    out["pass"] = {
        "speedup_vs_reference": None if x["speedup_vs_reference"] is None else x["speedup_vs_reference"] >= GOAL_SPEEDUP_VS_REF,
        "mem_vs_reference": None if x["mem_vs_reference"] is None else x["mem_vs_reference"] <= GOAL_MEM_FRACTION,
        "mfu": None if (not hopper or x["mfu_datasheet"] is None) else x["mfu_datasheet"] >= GOAL_MFU_HOPPER,
        "speedup_dual_vs_enc": None if x["speedup_dual_vs_enc"] is None else x["speedup_dual_vs_enc"] >= out["goal_speedup_dual_vs_enc"],
    }
    return out
