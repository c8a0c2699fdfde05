"""Memory policies (``set_grad_checkpointing(False | True | n | "selective")``): the same loss and
the same gradients, bit for bit, as the policy-free run, with drop path and dropout drawing; what
"selective" recomputes; and the saved-cast hooks of the policy-free run."""
from __future__ import annotations

import contextlib

import pytest
import torch

import vmae_fast
from vmae_fast.flops import attention_flops, counted_flops
from vmae_fast.layers import Blocks
from vmae_fast.memory import ATTENTION_RECOMPUTE_MAX, parse_policy, saved_casts_enabled
from vmae_fast.memory_count import cuda_autocast_rules, measure_train_step

from conftest import ODD

POLICIES = [False, True, 1, "selective"]
# fp32; bf16 autocast with the CPU's op lists; bf16 autocast with CUDA's (LayerNorm in float32,
# whose saved float32 input the policy-free run keeps in bf16)
AUTOCAST = [None, torch.bfloat16, "bf16-cuda-rules"]


def _ids(v):
    return "fp32" if v is None else str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v)


def _run(model, fwd, policy, autocast, seed=123):
    """Loss and gradients of one forward + backward under ``policy`` (RNG reseeded: drop path and
    dropout draw the same numbers in every run)."""
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(policy)
    torch.manual_seed(seed)
    rules = cuda_autocast_rules() if autocast == "bf16-cuda-rules" else contextlib.nullcontext()
    dtype = torch.bfloat16 if autocast == "bf16-cuda-rules" else autocast
    with rules:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = fwd()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (l0, g0), (l1, g1) = a, b
    assert torch.equal(l0, l1), (l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.equal(g0[n], g1[n]), (n, (g0[n] - g1[n]).abs().max())


@pytest.fixture(scope="module")
def pretrain():
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", drop_path_rate=0.3, init_values=0.1, **ODD)
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (2, 3, 6, 48, 48), dtype=torch.uint8, generator=g)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.6, 0.5, generator=g)
    return model.train(), (lambda: model(video, masks).loss)


@pytest.mark.parametrize("autocast", AUTOCAST, ids=_ids)
def test_pretrain_policies_identical(pretrain, autocast):
    """Every policy gives the loss and gradients of the run without any policy (no checkpointing,
    autograd saving what it saves, autocast caching its casts), bit for bit, drop path on."""
    model, fwd = pretrain
    with saved_casts_enabled(False):
        want = _run(model, fwd, False, autocast)
    for policy in POLICIES:
        _same(want, _run(model, fwd, policy, autocast))


@pytest.mark.parametrize("autocast", AUTOCAST, ids=_ids)
def test_classifier_policies_identical_with_dropout(autocast):
    """The classifier's blocks with drop path, dropout after proj/fc2 and attention dropout
    drawing: every policy equals the policy-free run."""
    torch.manual_seed(0)
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=5, drop_path_rate=0.2, drop_rate=0.1,
                                 attn_drop_rate=0.1, head_init_scale=1.0, embed_dim=48, depth=2, num_heads=2,
                                 patch_size=8, num_frames=4, img_size=32).train()
    video = torch.randn(2, 3, 4, 32, 32)
    fwd = lambda: clf(video).float().square().mean()  # noqa: E731
    with saved_casts_enabled(False):
        want = _run(clf, fwd, False, autocast)
    for policy in POLICIES:
        _same(want, _run(clf, fwd, policy, autocast))


def test_math_backend_selective_identical():
    """The explicit-matmul attention (``math`` backend): its two batched matmuls are kept."""
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", attn_backend="math", drop_path_rate=0.2, **ODD)
    video = torch.randn(2, 3, 6, 48, 48)
    masks = vmae_fast.DualMask.sample(2, model.grid, 0.6, 0.5)
    fwd = lambda: model(video, masks).loss  # noqa: E731
    want = _run(model, fwd, False, torch.bfloat16)
    _same(want, _run(model, fwd, "selective", torch.bfloat16))


def test_policy_arguments():
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", **ODD)
    enc, dec = model.encoder.blocks, model.decoder.blocks
    for arg, want in ((False, False), (True, True), (1, 1), (5, True), (0, False), ("selective", "selective"),
                      ("full", True), ("none", False)):
        model.set_grad_checkpointing(arg)
        assert enc.grad_checkpointing == want and dec.grad_checkpointing == want, arg
    assert parse_policy("selective", 3) == (3, "selective") and parse_policy(2, 3) == (2, "full")
    for bad in (-1, 1.5, "all", None):
        with pytest.raises(ValueError, match="grad checkpointing takes"):
            model.set_grad_checkpointing(bad)
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=2, grad_checkpointing="selective",
                                 embed_dim=48, depth=2, num_heads=2, patch_size=8, num_frames=4, img_size=32)
    assert isinstance(clf.blocks, Blocks) and clf.blocks.grad_checkpointing == "selective"


def _model_and_fwd(drop_path, encoder_ratio=0.9):
    torch.manual_seed(0)
    model = vmae_fast.create_pretrain_model("vit_small_patch16_224", drop_path_rate=drop_path, **ODD)
    video = torch.randn(2, 3, 6, 48, 48)
    masks = vmae_fast.DualMask.sample(2, model.grid, encoder_ratio, 0.5)

    def fwd_bwd():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(video, masks).loss
        loss.backward()
    return model, masks, fwd_bwd


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_selective_recomputes_proj_and_cheap_attention(drop_path):
    """Of the FLOP-counted ops, "selective" recomputes each block's ``proj`` (D x D) and, where it
    costs at most ``ATTENTION_RECOMPUTE_MAX`` of the block (the encoder's few visible tokens, not
    the decoder's), attention: ``qkv`` and ``fc1`` are kept, ``fc2`` is never needed again (or
    kept when drop path follows it). "full" recomputes every block's forward."""
    model, masks, fwd_bwd = _model_and_fwd(drop_path)
    cfg = model.cfg
    flops = {}
    for policy in (False, "selective", True):
        model.set_grad_checkpointing(policy)
        flops[policy], _ = counted_flops(fwd_bwd)
        model.zero_grad(set_to_none=True)
    B = 2
    n_enc = masks.visible_idx.shape[1]
    n_dec = n_enc + masks.decoder_idx.shape[1]
    want = 0
    for depth, n, dim in ((cfg.depth, n_enc, cfg.embed_dim), (cfg.decoder_depth, n_dec, cfg.decoder_embed_dim)):
        want += depth * 2 * B * n * dim ** 2  # proj
        if n / (6 * dim) <= ATTENTION_RECOMPUTE_MAX:
            want += depth * attention_flops(B, n, n, dim)  # (heads folded into dim: same count)
    assert n_enc / (6 * cfg.embed_dim) <= ATTENTION_RECOMPUTE_MAX < n_dec / (6 * cfg.decoder_embed_dim)
    assert flops["selective"] - flops[False] == want
    assert flops[True] - flops[False] > 3 * want


def test_saved_casts_hold_no_weight_copies():
    """Without checkpointing, the bytes held from forward to backward under bf16 autocast hold no
    bf16 copy of the blocks' weights (kept as the parameters, cast again in backward), and the
    activation peak has no copy of all weights at the end of forward (no autocast cast cache in
    the blocks): both drop by at least the bytes of those copies."""
    model, masks, _ = _model_and_fwd(0.0)
    video = torch.randn(2, 3, 6, 48, 48)
    fwd = lambda: model(video, masks).loss  # noqa: E731
    block_weights = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n and p.dim() == 2)
    res = {}
    for on in (False, True):
        with saved_casts_enabled(on):
            res[on] = measure_train_step(model, fwd, None, autocast_dtype=torch.bfloat16, warmup_steps=1)
    assert res[False].held_after_forward - res[True].held_after_forward >= 2 * block_weights
    assert res[False].peak_activations - res[True].peak_activations >= 2 * block_weights


def test_saved_casts_refuse_a_weight_changed_before_backward():
    """A weight edited in place between forward and backward: autograd's saved bf16 copy still
    holds the old values; the hooks keep the weight itself, so they raise rather than compute a
    gradient of the new values."""
    model, masks, _ = _model_and_fwd(0.0)
    video = torch.randn(2, 3, 6, 48, 48)
    w = model.encoder.blocks[0].mlp.fc2.weight
    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(video, masks).loss

    for on in (False, True):
        with saved_casts_enabled(on):
            forward().backward()  # the gradient of these weights, nothing edited
            want = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            loss = forward()
        with torch.no_grad():
            w.add_(1.0)
        if on:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        else:
            loss.backward()  # the copy autograd saved: the gradient of the forward that ran
            for n, p in model.named_parameters():
                assert torch.equal(p.grad, want[n]), n
        model.zero_grad(set_to_none=True)


def test_saved_casts_double_backward():
    """With ``create_graph=True`` the tensors the hooks unpack stay tied to their sources: the
    gradient of a gradient norm is the one without the hooks (``math`` attention: the fused CPU
    kernel has no double backward)."""
    torch.manual_seed(0)
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=3, embed_dim=48, depth=2, num_heads=2,
                                 patch_size=8, num_frames=4, img_size=32, head_init_scale=1.0, attn_backend="math")
    video = torch.randn(2, 3, 4, 32, 32)
    params = list(clf.parameters())
    res = []
    for on in (False, True):
        with saved_casts_enabled(on), cuda_autocast_rules():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = clf(video).float().square().sum()
            g = torch.autograd.grad(y, params, create_graph=True)
            res.append(torch.autograd.grad(sum(t.float().square().sum() for t in g), params, allow_unused=True))
    for a, b in zip(*res):
        assert (a is None and b is None) or torch.equal(a, b)
