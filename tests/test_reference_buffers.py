"""The reference's fixed positional tables are non-persistent buffers: they follow the module in
``.to()``/``.double()``/device moves without an ``nn.Module._apply`` override, and the state-dict
keys stay the official ones (equal to our models')."""
from __future__ import annotations

import pytest
import torch

import vmae_fast
from vmae_fast import reference
from vmae_fast.reference import ReferenceClassifier, ReferencePretrain

from conftest import rel_err, small_pretrain
from tolerances import MODEL_TOL

KW = dict(embed_dim=72, depth=1, num_heads=3, patch_size=8, num_frames=4, img_size=32)


def test_no_apply_override():
    for name in dir(reference):
        cls = getattr(reference, name)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            assert "_apply" not in vars(cls), f"{name} overrides nn.Module._apply"


@pytest.mark.parametrize("learnable", [False, True])
def test_pretrain_reference_tables_move_with_the_module(learnable):
    model = small_pretrain(depth=1, decoder_depth=1, learnable_pos_embed=learnable)
    ref = ReferencePretrain.from_model(model)
    assert set(ref.state_dict()) == set(model.state_dict())
    tables = {"encoder.pos_embed", "pos_embed"} if learnable else {"encoder.pos_embed_table", "pos_embed_table"}
    found = dict(ref.named_parameters()) if learnable else dict(ref.named_buffers())
    assert tables <= set(found), set(found)
    video = torch.randn(2, 3, 4, 64, 64, dtype=torch.float64)
    masks = model.sample_masks(2, 0.5, 0.5)
    ref.double()
    assert ref.encoder.pos().dtype == ref.dec_pos().dtype == torch.float64
    loss_ref, pred_ref = ref(video, masks.encoder_masked, masks.decoder_masked)
    out = model.double()(video, masks)
    assert rel_err(out.pred, pred_ref) < MODEL_TOL[torch.float64][0]
    # The loss is a float32 scalar by contract (ops.masked_mse_loss) whatever the model's dtype,
    # so its budget is float32's: torch 2.6's native build sums the rows in another order.
    assert out.loss.dtype == loss_ref.dtype == torch.float32
    assert rel_err(out.loss, loss_ref) < MODEL_TOL[torch.float32][0]
    ref.to("meta")
    assert ref.encoder.pos().device.type == ref.dec_pos().device.type == "meta"


def test_classifier_reference_tables_move_with_the_module():
    clf = vmae_fast.create_model("vit_small_patch16_224", num_classes=3, head_init_scale=1.0, **KW)
    ref = ReferenceClassifier.from_model(clf)
    assert set(ref.state_dict()) == set(clf.state_dict())
    assert "pos_embed_table" in dict(ref.named_buffers())
    ref.double()
    assert ref.pos_embed_table.dtype == torch.float64
    video = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    assert rel_err(clf.double()(video), ref(video)) < MODEL_TOL[torch.float64][0]
    ref.to("meta")
    assert ref.pos_embed_table.device.type == "meta"
