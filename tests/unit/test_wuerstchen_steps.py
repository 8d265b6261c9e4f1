"""Würstchen training steps (tiny presets) and the three-stage sampler."""
import pytest
import torch

from genmodels.wuerstchen import (
    SemanticCompressor,
    StageA,
    StageALossConfig,
    StageB,
    StageBLossConfig,
    StageC,
    StageCLossConfig,
    sample_stage_b,
    sample_stage_c,
    sample_three_stage,
    stage_a_loss,
    stage_b_loss,
    stage_c_loss,
)
from genmodels.wuerstchen.steps import perturb_semantic

B, L, W = 2, 5, 32  # batch, text length, tiny text width


def tiny_models():
    torch.manual_seed(0)
    return {"stage_a": StageA(), "compressor": SemanticCompressor(), "stage_b": StageB(), "stage_c": StageC()}


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    return {
        "image": img,
        "image_sem": img,
        "latent_a": torch.randn(B, 4, 16, 16, generator=g),
        "latent_sem": torch.randn(B, 16, 4, 4, generator=g),
        "text_tokens": torch.randn(B, L, W, generator=g),
        "text_tokens_uncond": torch.randn(1, L, W, generator=g),
    }


def test_steps_return_scalar_loss_and_float_logs():
    models, batch = tiny_models(), tiny_batch()
    for fn, keys in [
        (stage_a_loss, ["image"]),
        (stage_b_loss, ["latent_a", "image_sem", "text_tokens", "text_tokens_uncond"]),
        (stage_b_loss, ["image", "latent_sem", "text_tokens"]),
        (stage_c_loss, ["latent_sem", "text_tokens"]),
        (stage_c_loss, ["image_sem", "text_tokens", "text_tokens_uncond"]),
    ]:
        loss, logs = fn(models, {k: batch[k] for k in keys}, None)
        assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
        assert all(isinstance(v, float) for v in logs.values()) and "loss" in logs


def test_stage_b_trains_compressor_jointly():
    models, batch = tiny_models(), tiny_batch()
    cfg = StageBLossConfig(p_sem_zero=0.0, p_sem_noise=0.0)
    loss, _ = stage_b_loss(models, {k: batch[k] for k in ["latent_a", "image_sem", "text_tokens"]}, cfg)
    loss.backward()
    assert models["compressor"].mapper[0].weight.grad is not None
    assert models["stage_b"].text_mapper.weight.grad is not None


def test_perturb_semantic():
    z = torch.randn(64, 16, 2, 2)
    assert torch.equal(perturb_semantic(z, StageBLossConfig(p_sem_zero=0, p_sem_noise=0)), z)
    assert torch.equal(perturb_semantic(z, StageBLossConfig(p_sem_zero=1, p_sem_noise=0)), torch.zeros_like(z))
    noised = perturb_semantic(z, StageBLossConfig(p_sem_zero=0, p_sem_noise=1))
    assert not (noised == z).flatten(1).all(1).any()


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_tiny_stage_overfits_fixed_batch(stage):
    """Loss on one fixed batch (fixed t and noise via a re-seeded RNG) goes down in 40 steps."""
    models, batch = tiny_models(), tiny_batch()
    fn, params, cfg, lr = {
        "a": (stage_a_loss, models["stage_a"].parameters(), StageALossConfig(), 3e-3),
        "b": (stage_b_loss, list(models["stage_b"].parameters()) + list(models["compressor"].parameters()),
              StageBLossConfig(p_uncond=0, p_sem_zero=0, p_sem_noise=0), 3e-3),
        "c": (stage_c_loss, models["stage_c"].parameters(), StageCLossConfig(p_uncond=0), 3e-3),
    }[stage]
    if stage == "b":
        batch = {k: batch[k] for k in ["latent_a", "image_sem", "text_tokens"]}
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(40):
        torch.manual_seed(123)
        loss, _ = fn(models, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (stage, first, last)


def test_three_stage_sampler_shapes_and_determinism():
    models = tiny_models()
    for m in models.values():
        m.eval()
    tc, tb = torch.randn(B, L, W), torch.randn(B, L, W)
    uc, ub = torch.zeros(1, L, W), torch.zeros(1, L, W)

    def run(seed, **kw):
        return sample_three_stage(models, tc, tb, uc, ub, image_size=(64, 64), guidance_b=2.0,
                                  generator=torch.Generator().manual_seed(seed), **kw)

    img = run(0)  # defaults: 29 Stage C steps, 12 Stage B steps
    assert img.shape == (B, 3, 64, 64) and img.min() >= -1 and img.max() <= 1
    assert torch.equal(run(0, steps_c=3, steps_b=2), run(0, steps_c=3, steps_b=2))
    assert not torch.equal(run(0, steps_c=3, steps_b=2), run(1, steps_c=3, steps_b=2))

    g = torch.Generator().manual_seed(0)
    z = sample_stage_c(models, tc, uc, sem_size=(4, 4), steps=4, generator=g)
    assert z.shape == (B, 16, 4, 4)
    lat = sample_stage_b(models, z, tb, latent_size=(16, 16), steps=3, generator=g)
    assert lat.shape == (B, 4, 16, 16)
    with pytest.raises(ValueError):
        sample_three_stage({"stage_a": models["stage_a"]}, tc, tb, image_size=(64, 64))
