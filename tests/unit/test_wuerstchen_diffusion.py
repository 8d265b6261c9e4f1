"""Würstchen diffusion math: schedule, noising, weights, t-sampling, DDPM step, CFG, sampler."""
import math

import torch
from torch import nn

from genmodels.wuerstchen.diffusion import (
    add_noise,
    alpha_bar,
    cfg_eps,
    ddpm_step,
    drop_condition,
    eps_loss,
    linear_timesteps,
    p2_weight,
    sample,
    sample_t,
    snr,
    stage_c_timesteps,
)


def closed_form_alpha_bar(t: float, s: float = 0.008) -> float:
    v = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(v, 1e-4), 0.9999)


def test_alpha_bar_matches_closed_form():
    ts = [0.0, 0.001, 0.1, 0.37, 0.5, 0.9, 0.99, 1.0]
    got = alpha_bar(torch.tensor(ts))
    want = torch.tensor([closed_form_alpha_bar(t) for t in ts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[0] == torch.tensor(0.9999) and got[-1] == torch.tensor(1e-4)  # clamped ends
    assert torch.all(got[1:] <= got[:-1])


def test_noising_and_p2():
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.1, 0.5, 0.9])
    ab = torch.tensor([closed_form_alpha_bar(v) for v in t.tolist()]).view(3, 1, 1, 1)
    torch.testing.assert_close(add_noise(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    torch.testing.assert_close(snr(t), ab.flatten() / (1 - ab.flatten()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p2_weight(t), 1 / (1 + snr(t)))
    torch.testing.assert_close(p2_weight(t), 1 - ab.flatten())  # 1/(1+SNR) == 1 - ᾱ


def test_sample_t_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20000, generator=g)
    assert t.min() >= 0.001 and t.max() <= 1.0
    frac_one = (t == 1.0).float().mean().item()
    assert abs(frac_one - 0.08 / 1.08) < 0.01  # ~7% at pure noise


def test_timestep_lists():
    tc = stage_c_timesteps()
    assert len(tc) == 30 and tc[0] == 1 and tc[-1] == 0  # 29 steps
    torch.testing.assert_close(tc[19], torch.tensor(2 / 3))
    assert torch.all(tc[1:] < tc[:-1])
    tb = linear_timesteps(12)
    assert len(tb) == 13 and tb[0] == 1 and tb[-1] == 0


def test_ddpm_step_is_posterior_mean():
    """ε-form mean equals the x0-form DDPM posterior mean (Ho et al. 2020, Eq. 7)."""
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, tp = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.2])
    xt = add_noise(x0, t, eps)
    ab, abp = alpha_bar(t).view(2, 1, 1, 1), alpha_bar(tp).view(2, 1, 1, 1)
    alpha, beta = ab / abp, 1 - ab / abp
    mean = abp.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - abp) / (1 - ab) * xt
    torch.testing.assert_close(ddpm_step(xt, eps, t, tp, torch.zeros_like(xt)), mean, rtol=1e-4, atol=1e-5)
    z = torch.randn_like(xt)
    std = ((1 - alpha) * (1 - abp) / (1 - ab)).sqrt()
    torch.testing.assert_close(ddpm_step(xt, eps, t, tp, z), mean + std * z, rtol=1e-4, atol=1e-5)
    last = ddpm_step(xt, eps, t, torch.zeros(2), z)  # no noise into t = 0
    torch.testing.assert_close(last, ddpm_step(xt, eps, t, torch.zeros(2), torch.zeros_like(z)))


class ToyNet(nn.Module):
    """ε̂ depends on x, t and the condition; counts calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def forward(self, x, t, text):
        self.calls += 1
        return self.w * x + t.view(-1, 1, 1, 1) + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_cfg_is_lerp():
    net = ToyNet()
    x, t = torch.randn(2, 4, 3, 3), torch.rand(2)
    c, u = {"text": torch.randn(2, 5, 8)}, {"text": torch.zeros(2, 5, 8)}
    e_c, e_u = net(x, t, **c), net(x, t, **u)
    w = 4.0
    torch.testing.assert_close(cfg_eps(net, x, t, c, u, w), e_u + w * (e_c - e_u))
    net.calls = 0
    torch.testing.assert_close(cfg_eps(net, x, t, c, u, 1.0), e_c)  # w <= 1: guidance off
    assert net.calls == 1


def test_sampler_deterministic_with_generator():
    net = ToyNet()
    cond, uncond = {"text": torch.randn(2, 5, 8)}, {"text": torch.zeros(2, 5, 8)}

    def run(seed):
        return sample(net, (2, 4, 3, 3), cond, stage_c_timesteps(), uncond, 4.0, torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_drop_condition():
    cond = torch.randn(6, 3, 4)
    assert torch.equal(drop_condition(cond, 0.0), cond)
    null = torch.randn(1, 3, 4)
    assert torch.equal(drop_condition(cond, 1.0, null), null.expand_as(cond))
    assert torch.equal(drop_condition(cond, 1.0), torch.zeros_like(cond))
    g = torch.Generator().manual_seed(0)
    out = drop_condition(cond, 0.5, generator=g)
    kept = (out == cond).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert torch.all(kept | dropped)


def test_eps_loss_matches_manual():
    net = ToyNet()
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.2, 0.5, 0.95])
    cond = {"text": torch.randn(3, 5, 8)}
    loss, mse = eps_loss(net, x0, cond, t=t, noise=noise, p2=True)
    pred = net(add_noise(x0, t, noise), t, **cond)
    per = ((pred - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(mse, per.detach())
    torch.testing.assert_close(loss, (per * p2_weight(t)).mean())
