"""Würstchen weight-name mapping to / from the diffusers v2 layout."""
import pytest
import torch

from genmodels.wuerstchen import (
    STAGE_C_PRESETS,
    StageA,
    StageB,
    StageBConfig,
    StageC,
    map_diffusers_state_dict,
    to_diffusers_state_dict,
)

THREE_LEVEL_B = StageBConfig(
    c_hidden=(16, 32, 32), nhead=(0, 2, 4), blocks=(1, 2, 1), level_config=("CT", "CTA", "CTA"),
    inject_sem=(False, True, True),
)


@pytest.mark.parametrize(
    "kind,build,expected_keys",
    [
        ("stage_a", StageA, ["vquantizer.embedding.weight", "down_blocks.3.1.running_mean", "up_blocks.0.0.weight",
                             "down_blocks.0.depthwise.1.weight", "up_blocks.3.channelwise.2.bias", "up_blocks.2.weight",
                             "in_block.1.weight"]),
        ("stage_b", StageB, ["clip_mapper.weight", "embedding.1.weight", "clf.1.bias", "effnet_mappers.1.weight",
                             "effnet_mappers.2.weight", "down_blocks.1.0.1.weight",
                             "down_blocks.1.3.attention.to_q.weight", "up_blocks.0.3.1.weight",
                             "up_blocks.0.0.channelwise.2.gamma", "up_blocks.1.1.mapper.weight"]),
        ("stage_b", lambda: StageB(THREE_LEVEL_B), ["effnet_mappers.4.weight", "up_blocks.1.6.1.weight",
                                                    "down_blocks.2.0.1.bias",
                                                    "up_blocks.1.5.attention.to_out.0.weight"]),
        ("stage_c", StageC, ["projection.weight", "cond_mapper.2.weight", "blocks.4.mapper.weight",
                             "blocks.5.attention.to_out.0.weight", "blocks.5.kv_mapper.1.weight", "out.1.bias"]),
    ],
)
def test_round_trip_is_exact(kind, build, expected_keys):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # distinct values everywhere so a swapped name would show
    ours = model.state_dict()
    theirs = to_diffusers_state_dict(kind, ours)
    for k in expected_keys:
        assert k in theirs, (k, sorted(theirs)[:20])
    back = map_diffusers_state_dict(kind, theirs)
    assert set(back) == set(ours)
    for k in ours:
        assert torch.equal(back[k], ours[k]), k
    fresh = build()
    fresh.load_state_dict(back, strict=True)


def test_paper_prior_names_on_meta():
    with torch.device("meta"):
        sd = StageC(STAGE_C_PRESETS["paper"]).state_dict()
    theirs = to_diffusers_state_dict("stage_c", sd)
    assert "blocks.95.attention.to_q.weight" in theirs and "blocks.96.mapper.weight" not in theirs
    assert theirs["cond_mapper.0.weight"].shape == (1536, 1280)


def test_unknown_names_raise():
    with pytest.raises(KeyError):
        map_diffusers_state_dict("stage_c", {"not_a_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        to_diffusers_state_dict("stage_z", {})
