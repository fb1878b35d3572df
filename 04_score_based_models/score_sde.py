"""
Score SDE: train a time-conditioned score network s_theta(x, t) and sample by reversing a diffusion SDE.

Paper: Song, Sohl-Dickstein, Kingma, Kumar, Ermon and Poole, "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR 2021, arXiv 2011.13456. Likelihood weighting: Song, Durkan,
Murray and Ermon, "Maximum Likelihood Training of Score-Based Diffusion Models", NeurIPS 2021, arXiv 2101.09258.

The idea: a forward SDE dx = f(x, t) dt + g(t) dW turns data into noise over t in [0, 1]. Run backwards
(Anderson 1982) it needs one unknown, the score grad_x log p_t(x), which a network learns by denoising
score matching at every t at once. VE (--sde ve) is the continuous NCSN, VP (--sde vp) the continuous
DDPM. Samples come from the reverse SDE (Euler-Maruyama or predictor-corrector) or from the
probability-flow ODE, which has the same marginals and therefore gives exact log-likelihoods.

    VE: f = 0,              g = sigma(t) sqrt(2 log(sigma_max / sigma_min)), p_0t = N(x0, sigma(t)^2 - sigma_min^2)   (README Eq. 3.6)
    VP: f = -beta(t) x / 2, g = sqrt(beta(t)), p_0t = N(x0 exp(-B(t) / 2), 1 - exp(-B(t))), B(t) = int_0^t beta   (README Eq. 3.8)
    L = E_t E_x0 E_z lambda(t) || s_theta(xt, t) + z / std(t) ||^2, lambda = std(t)^2 or g(t)^2   (README Eq. 3.10)
    reverse SDE: dx = [f - g^2 score] dt + g dW~;   probability flow: dx/dt = f - g^2 score / 2   (README Eq. 3.2, 3.13)
    log p_0(x0) = log p_1(x1) + int_0^1 div f~(xt, t) dt,  div f~ ~ v^T (d f~ / dx) v  (Hutchinson)   (README Eq. 3.14, 3.16)

Run:   python 04_score_based_models/score_sde.py                  (defaults sized for one GPU, not measured on a GPU)
CPU recipe: python 04_score_based_models/score_sde.py --amp --steps 3800 --batch-size 128 --lr 2e-3 --sample-steps 200 --time-grid quadratic --snr 0.05 --log-every 500
Measured on a 2-core CPU with AVX-512 BF16 (--amp: bf16 autocast of the network in training and sampling): 13 min 35 s (wall, whole command: 653 s training, 158 s for 1000 PC samples, NFE = 399); FID 23.2 at N = 1000, 81.2 % confident > 0.9, smallest class 8.0 %: recognizable digits; with --seed 1: 14 min 19 s, 81.8 %, FID 17.1; with --seed 2: 14 min 9 s, 77.2 %, below the bar (the CPU's speed drifts from hour to hour, README section 3); --sample-only --eval-nll: 2.213 bits/dim on N = 100 test digits (200 Heun steps geometric in t, NFE = 400). Without bf16 instructions, time a few steps with and without --amp.
Writes out/score_sde/: ckpt.pt, samples.png, samples.npz (--eval-nll prints bits/dim; 2-D data writes points).
"""

import argparse
import copy
import dataclasses
import gzip
import hashlib
import inspect
import math
import os
import re
import struct
import sys
import time
import typing
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast for the network in training and sampling, on CUDA or CPU (losses, sampler arithmetic and likelihoods stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/score_sde"  # checkpoint, samples and grids go here
    steps: int = 30000  # optimizer steps
    batch_size: int = 128  # images (or points) per step
    lr: float = 2e-4  # Adam learning rate (the paper's), after a linear warm-up
    warmup: int = 200  # steps of linear learning-rate warm-up
    dataset: str = "mnist"  # mnist | moons | 8gaussians | swissroll | checkerboard | rings
    sde: str = "vp"  # vp (continuous DDPM) | ve (continuous NCSN)
    beta_min: float = 0.1  # VP: beta(t) = beta_min + t (beta_max - beta_min)
    beta_max: float = 20.0  # VP
    sigma_min: float = 0.01  # VE: sigma(t) = sigma_min (sigma_max / sigma_min)^t
    sigma_max: float = 50.0  # VE: about the largest distance between two data points
    t_eps: float = 1e-3  # smallest time: training draws t ~ U[t_eps, 1], samplers and likelihoods stop there
    likelihood_weighting: bool = False  # lambda(t) = g(t)^2 (a bound on the KL, README Eq. 3.11) instead of std(t)^2
    channels: int = 32  # U-Net width at 14 x 14 (on 2 x 2 patches; twice that at 7 x 7), a multiple of 8; MLP width / 4 for 2-D data
    ema: float = 0.999  # decay of the moving average of the weights used for sampling, after a warm-up: min(ema, (1 + n) / (10 + n)) at step n
    sampler: str = "pc"  # em (reverse-time Euler-Maruyama) | pc (predictor-corrector) | ode (probability flow, Heun)
    sample_steps: int = 500  # time steps of the sampler (pc adds one corrector step per step)
    time_grid: str = "uniform"  # uniform | quadratic: the sampler's times t_i = t_eps + (1 - t_eps)(1 - i/N)^p, p = 1 or 2
    snr: float = 0.16  # Langevin corrector signal-to-noise ratio r (README Eq. 3.12); 0.16 is the paper's VE setting
    eval_nll: bool = False  # bits/dim (or nats for 2-D) of test data by the probability-flow ODE (with --sample-only: only that)
    nll_num: int = 100  # test images (or points) for --eval-nll
    nll_steps: int = 200  # Heun steps for --eval-nll (2 function evaluations each; VP: geometric in t)
    num_samples: int = 1000  # samples for samples.npz
    log_every: int = 1000  # steps between loss reports and checkpoints
    sample_only: bool = False  # skip training; sample (and --eval-nll) from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        toys = ("moons", "8gaussians", "swissroll", "checkerboard", "rings")
        for name, value, allowed in [("dataset", self.dataset, ("mnist",) + toys), ("sde", self.sde, ("vp", "ve")),
                                     ("sampler", self.sampler, ("em", "pc", "ode")), ("time-grid", self.time_grid, ("uniform", "quadratic"))]:
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not (0 < self.t_eps < 1 and 0 < self.beta_min < self.beta_max and 0 < self.sigma_min < self.sigma_max):
            raise ValueError("need 0 < t-eps < 1, 0 < beta-min < beta-max and 0 < sigma-min < sigma-max")
        if min(self.channels, self.sample_steps, self.nll_num, self.nll_steps) < 1 or not 0 <= self.ema < 1 or self.snr < 0:
            raise ValueError("--channels, --sample-steps, --nll-num and --nll-steps must be positive, 0 <= --ema < 1, --snr >= 0")
        if self.dataset == "mnist" and self.channels % 8:
            raise ValueError(f"--channels must be a multiple of 8 for MNIST (GroupNorm's 8 groups), got {self.channels}")


# --- Model ---


def time_features(t, dim):  # (B,) -> (B, dim)
    """Sinusoidal features of t (the Transformer's, as DDPM's): [sin, cos](t w_k) with w_k = 1000 / 10000^(k / (dim/2)),
    DDPM's frequencies on its step 1000 t, so that fast and slow changes in t are both easy to express."""
    angle = t[:, None] * (1000 * 1e-4 ** (torch.arange(dim // 2, device=t.device) / (dim // 2)))
    return torch.cat([angle.sin(), angle.cos()], 1)


class Attention(nn.Module):
    """Single-head self-attention over the H * W positions, added back to the input."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.GroupNorm(8, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # each (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the time embedding as a per-channel bias, GroupNorm -> SiLU -> conv, added
    to the input (through a 1 x 1 conv when the width changes); optional self-attention after."""

    def __init__(self, c_in, c_out, emb_dim, attention=False):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as its skip path
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attention else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, emb_dim) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    """Module 05's U-Net on 2 x 2 patches: pixel_unshuffle makes the (B, 1, 28, 28) input (B, 4, 14, 14), so its levels
    are c channels at 14 x 14 and 2c at 7 x 7 and no layer runs at 28 x 28 (README section 3, "In the code"). One residual
    block per level down, two up, two in the middle with self-attention after the first; each down-path output feeds one up
    block by concatenation; unlike module 05, the up-sampling halves the channels. Returns (B, 1, 28, 28), which ScoreSDE divides by std(t) (Eq. 3.10)."""

    def __init__(self, c=32):
        super().__init__()
        self.c, emb = c, 4 * c
        self.embed = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(c, c, emb), nn.Conv2d(c, c, 3, 2, 1),  # 14 x 14, then down to 7 x 7
                                   ResBlock(c, 2 * c, emb)])  # 7 x 7
        self.mid = nn.ModuleList([ResBlock(2 * c, 2 * c, emb, attention=True), ResBlock(2 * c, 2 * c, emb)])
        self.up = nn.ModuleList([ResBlock(4 * c, 2 * c, emb), ResBlock(3 * c, 2 * c, emb),  # 7 x 7, then up to 14 x 14
                                 nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(2 * c, c, 3, padding=1)),  # 2c -> c
                                 ResBlock(2 * c, c, emb), ResBlock(2 * c, c, emb)])  # 14 x 14
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 4, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start at output 0: the score starts at 0, the loss at E||z||^2
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):  # (B, 1, 28, 28), (B,) -> (B, 1, 28, 28)
        emb = self.embed(time_features(t, self.c))  # (B, 4c)
        h = self.conv_in(F.pixel_unshuffle(x, 2))  # (B, c, 14, 14): pixel (2i + a, 2j + b) is channel 2a + b at (i, j)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        return F.pixel_shuffle(self.out(h), 2)  # (B, 4, 14, 14) -> (B, 1, 28, 28)


class ToyNet(nn.Module):
    """The 2-D counterpart: an MLP on [x, embedding(t)]."""

    def __init__(self, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t):  # (B, 2), (B,) -> (B, 2)
        return self.net(torch.cat([x, time_features(t, 32)], 1))


# --- The method ---


class ScoreSDE(nn.Module):
    """The forward SDE (VE or VP), its perturbation kernel, the DSM objective, the three samplers and the
    probability-flow likelihood. Methods taking `score` accept any function (x, t) -> score, so the tests
    can plug in the exact score of a Gaussian; by default it is the network's, s_theta(x, t) = net(x, t) / std(t)."""

    def __init__(self, net, sde="vp", beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0, t_eps=1e-3):
        super().__init__()
        self.net, self.kind, self.t_eps = net, sde, t_eps
        self.beta_min, self.beta_max, self.sigma_min, self.sigma_max = beta_min, beta_max, sigma_min, sigma_max

    def _expand(self, v, x):  # (B,) -> (B, 1, ..., 1) to broadcast against x
        return v.view(-1, *([1] * (x.dim() - 1)))

    def sde(self, x, t):
        """Drift f(x, t) (like x) and diffusion g(t) (B,): README Eq. 3.5 (VE) and 3.7 (VP)."""
        if self.kind == "ve":
            sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
            return torch.zeros_like(x), sigma * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return -0.5 * self._expand(beta, x) * x, beta.sqrt()

    def marginal(self, t):
        """Perturbation kernel p_0t(xt | x0) = N(mean(t) x0, std(t)^2 I): README Eq. 3.6 and 3.8."""
        if self.kind == "ve":
            sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
            return torch.ones_like(t), (sigma ** 2 - self.sigma_min ** 2).sqrt()
        big_b = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2  # B(t) = int_0^t beta
        return (-0.5 * big_b).exp(), (-torch.expm1(-big_b)).sqrt()

    def prior_log_prob(self, x):
        """log p_1(x): N(0, I) for VP, N(0, std(1)^2 I) for VE, summed over dimensions. (B,)"""
        var = 1.0 if self.kind == "vp" else self.sigma_max ** 2 - self.sigma_min ** 2
        return -0.5 * x.flatten(1).pow(2).sum(1) / var - 0.5 * x[0].numel() * math.log(2 * math.pi * var)

    def score(self, x, t):
        """s_theta(x, t) = net(x, t) / std(t): dividing by the kernel's std gives the network an O(1) target."""
        return self.net(x, t).to(x.dtype) / self._expand(self.marginal(t)[1], x)

    def loss(self, x0, likelihood_weighting=False):
        """README Eq. 3.9 (the paper's Eq. 7) in the form of Eq. 3.10: lambda(t) || s_theta(xt, t) -
        grad log p_0t(xt | x0) ||^2 with grad log p_0t = -z / std. With lambda = std^2 this is || net + z ||^2
        (DDPM's loss); with lambda = g^2 it is g^2 / std^2 || net + z ||^2. Summed over pixels, divided by D
        for readability."""
        t = torch.rand(x0.shape[0], device=x0.device) * (1 - self.t_eps) + self.t_eps  # t ~ U[t_eps, 1]
        z = torch.randn_like(x0)
        mean, std = self.marginal(t)
        xt = self._expand(mean, x0) * x0 + self._expand(std, x0) * z
        per_example = (self.net(xt, t).float() + z).flatten(1).pow(2).sum(1) / x0[0].numel()
        weight = self.sde(x0, t)[1] ** 2 / std ** 2 if likelihood_weighting else torch.ones_like(t)
        return (weight * per_example).mean()

    def ode_drift(self, x, t, score=None):
        """Probability-flow ODE: f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2 (README Eq. 3.13)."""
        f, g = self.sde(x, t)
        return f - 0.5 * self._expand(g ** 2, x) * (score or self.score)(x, t)

    def flow(self, x, t_from, t_to, steps, score=None):
        """Heun's method (explicit trapezoid, 2nd order, 2 evaluations a step) on dx/dt = f~(x, t), either direction."""
        ts = torch.linspace(float(t_from), float(t_to), steps + 1, device=x.device, dtype=x.dtype)
        for i in range(steps):
            dt, t, t_next = ts[i + 1] - ts[i], ts[i].repeat(x.shape[0]), ts[i + 1].repeat(x.shape[0])
            d1 = self.ode_drift(x, t, score)
            x = x + 0.5 * dt * (d1 + self.ode_drift(x + dt * d1, t_next, score))
        return x

    @torch.no_grad()
    def sample(self, shape, sampler="pc", steps=500, snr=0.16, score=None, x=None, generator=None, grid="uniform"):
        """From t = 1 (x ~ prior) down to t_eps on a uniform or quadratic time grid (README section 3.4). Returns (x0, NFE)."""
        score = score or self.score
        device = next(self.parameters()).device if x is None else x.device
        randn = lambda: torch.randn(shape, device="cpu", generator=generator).to(device)  # noqa: E731
        if x is None:
            x = randn() * (1.0 if self.kind == "vp" else self.marginal(torch.ones(1))[1].item())
        ts = self.t_eps + (1 - self.t_eps) * (1 - torch.linspace(0.0, 1.0, steps + 1, device=device)) ** (2 if grid == "quadratic" else 1)
        nfe = 0
        for i in range(steps):
            t, t_next = ts[i].repeat(shape[0]), ts[i + 1].repeat(shape[0])
            if sampler == "ode":  # probability flow from t to t_next (README Eq. 3.13)
                x, nfe = self.flow(x, ts[i], ts[i + 1], 1, score), nfe + 2
                continue
            if sampler == "em":  # Euler-Maruyama on the reverse SDE (README Eq. 3.2), time step -dt
                dt = ts[i] - ts[i + 1]
                f, g = self.sde(x, t)
                g = self._expand(g, x)
                mean = x - (f - g ** 2 * score(x, t)) * dt
                x, nfe = mean + g * dt.sqrt() * randn(), nfe + 1
                continue
            # pc: reverse-diffusion predictor (Algorithm 2 / 3 of the paper) with the exact one-step forward
            # kernel x_t = a x_next + sqrt(v) z from t_next to t, i.e. f_i = (a - 1) x, G_i^2 = v
            a, v = self._step_kernel(t_next, t, x)
            mean = x - (a - 1) * x + v * score(x, t)
            x, nfe = mean + v.sqrt() * randn(), nfe + 1
            if i < steps - 1:  # Langevin corrector at t_next (Algorithms 4 / 5), step from the snr rule
                s, z = score(x, t_next), randn()
                ratio = snr * z.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)  # per sample
                step = 2 * a ** 2 * self._expand(ratio ** 2, x)  # README Eq. 3.12
                x, nfe = x + step * s + (2 * step).sqrt() * z, nfe + 1
        return (mean if sampler != "ode" else x), nfe

    def _step_kernel(self, t_from, t_to, x):
        """a, v of p(x_{t_to} | x_{t_from}) = N(a x, v I) for t_to > t_from, broadcast to x; VE has a = 1
        (alpha_i = 1 in Algorithm 4), VP has a = sqrt(alpha_i) = sqrt(1 - beta_i) in Algorithm 5."""
        m_from, s_from = self.marginal(t_from)
        m_to, s_to = self.marginal(t_to)
        a = m_to / m_from
        return self._expand(a, x), self._expand(s_to ** 2 - a ** 2 * s_from ** 2, x)

    def log_likelihood(self, x0, steps=100, score=None, probe="rademacher", generator=None, divergence=True):
        """log p_{t_eps}(x0) (B,) by the instantaneous change of variables (README Eq. 3.15): integrate
        d(x, delta)/dt = (f~, div f~) from t_eps to 1 with Heun, then add log p_1(x_1). div f~ by
        Hutchinson (Eq. 3.16): v^T (d f~/dx) v, one probe v per trajectory, fixed over time, from a
        vector-Jacobian product. Returns (log p, NFE). divergence=False drops the term (for the tests)."""
        draw = torch.randn(x0.shape, device="cpu", generator=generator, dtype=x0.dtype)
        v = (draw.sign() if probe == "rademacher" else draw).to(x0.device)
        # VP: steps geometric in t, i.e. about uniform in log std(t) near t_eps (std^2 ~ beta_min t there), where
        # the score changes fastest; a uniform grid wastes them near t = 1. VE's sigma(t) is geometric in t already.
        if self.kind == "vp":
            ts = torch.logspace(math.log10(self.t_eps), 0.0, steps + 1, device=x0.device, dtype=x0.dtype)
        else:
            ts = torch.linspace(self.t_eps, 1.0, steps + 1, device=x0.device, dtype=x0.dtype)

        def drift_and_div(x, t):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                drift = self.ode_drift(x, t.to(x.dtype).repeat(x.shape[0]), score)
                vjp = torch.autograd.grad((drift * v).sum(), x)[0] if divergence else torch.zeros_like(x)
            return drift.detach(), (vjp * v).flatten(1).sum(1)

        x, delta = x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
        for i in range(steps):
            dt = ts[i + 1] - ts[i]
            d1, div1 = drift_and_div(x, ts[i])
            d2, div2 = drift_and_div(x + dt * d1, ts[i + 1])
            x, delta = x + 0.5 * dt * (d1 + d2), delta + 0.5 * dt * (div1 + div2)
        return self.prior_log_prob(x) + delta, 2 * steps


# --- Training ---


def to_model_range(x_uint8):
    """Dequantize (Eq. 3.13 of module 03) and map y in (0, 1) to the model's range x = 2 y - 1 (README Eq. 3.18)."""
    return 2 * dequantize(x_uint8).unsqueeze(1) - 1  # (B, 1, 28, 28) in (-1, 1)


def evaluate_nll(model, cfg, device):
    """Bits/dim of nll_num test digits (README Eq. 3.18), or nats per point for 2-D data, by Eq. 3.15."""
    gen, t0, mnist = torch.Generator().manual_seed(cfg.seed + 1), time.time(), cfg.dataset == "mnist"
    x = to_model_range(load_mnist(cfg.data_dir, train=False)[0][:cfg.nll_num]) if mnist else toy_2d(cfg.dataset, cfg.nll_num, gen)
    log_p, nfe = model.log_likelihood(x.to(device), cfg.nll_steps, generator=gen)
    if mnist:
        d = x[0].numel()
        bpd = bits_per_dim(log_p + d * math.log(2), d).mean().item()  # + D log 2: the Jacobian of y -> 2y - 1
        print(f"bits/dim {bpd:.3f} (upper bound on the discrete bits/dim) on N = {len(x)} test digits, "
              f"NFE = {nfe} (Heun, {cfg.nll_steps} steps, Hutchinson), {time.time() - t0:.0f} s")
        return {"bits_per_dim": bpd, "nll_nfe": nfe}
    line = f"NLL {-log_p.mean().item():.3f} nats on N = {len(x)} points, NFE = {nfe}, {time.time() - t0:.0f} s"
    if cfg.dataset in ("8gaussians", "checkerboard"):
        line += f"; exact NLL of the data density {-toy_2d_log_prob(cfg.dataset, x.cpu()).mean().item():.3f}"
    print(line)
    return {"nll": -log_p.mean().item(), "nll_nfe": nfe}


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mnist = cfg.dataset == "mnist"
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device) if mnist else None  # (N, 28, 28) uint8

    net = UNet(cfg.channels) if mnist else ToyNet(4 * cfg.channels)
    model = ScoreSDE(net, cfg.sde, cfg.beta_min, cfg.beta_max, cfg.sigma_min, cfg.sigma_max, cfg.t_eps).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # the weights we sample with
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        try:
            for part, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
                part.load_state_dict(ckpt[key])
        except RuntimeError:  # another --channels, or a checkpoint of an earlier version of this network
            raise SystemExit(f"error: {out / 'ckpt.pt'} holds another network; pass the flags it was trained with (--channels {ckpt['config']['channels']}) or retrain")
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type in ("cuda", "cpu"))
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="score_sde")
    running = 0.0
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a batch of data in the model's range: dequantized digits in (-1, 1), or toy points
            x0 = (to_model_range(x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]) if mnist
                  else toy_2d(cfg.dataset, cfg.batch_size).to(device))
            # 2. DSM at t ~ U[t_eps, 1] (README Eq. 3.10)
            with autocast:
                loss = model.loss(x0, cfg.likelihood_weighting)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. a clipped Adam step after a linear warm-up, then the EMA update
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - min(cfg.ema, (1 + step) / (10 + step)))  # with module 05's warm-up
            step += 1
            running += loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"step {step}: mean loss {running / (step % cfg.log_every or cfg.log_every):.4f}")
                running = 0.0
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    if not cfg.sample_only:
        print(f"trained {step} steps in {time.time() - t0:.0f} s")

    ema.eval()
    results = {"step": step}
    if cfg.eval_nll:
        results.update(evaluate_nll(ema, cfg, device))
        if cfg.sample_only:  # an evaluation of a trained model: keep its samples as they are
            return results
    t0, gen = time.time(), torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.num_samples, 1, 28, 28) if mnist else (cfg.num_samples, 2)
    chunks, nfe = [], 0
    for start in range(0, cfg.num_samples, 250):  # chunks of 250 keep memory flat and ran fastest here (README section 3)
        with autocast:  # the network in bf16 when asked; score() returns float32, so the sampler's arithmetic stays float32
            x, nfe = ema.sample((min(250, cfg.num_samples - start),) + shape[1:], cfg.sampler, cfg.sample_steps, cfg.snr,
                                  generator=gen, grid=cfg.time_grid)
        chunks.append(x.float().cpu())
    x = torch.cat(chunks)
    print(f"sampled {len(x)} with {cfg.sampler} ({cfg.sample_steps} steps on a {cfg.time_grid} grid, NFE = {nfe}) in {time.time() - t0:.0f} s")
    if mnist:
        images = ((x + 1) / 2 * 256).floor().clamp(0, 255).byte()  # back to 8-bit pixels, inverse of to_model_range
        save_grid(images[:64].float() / 255, out / "samples.png", nrow=8)
        np.savez_compressed(out / "samples.npz", images=images.numpy())
    else:
        hist = torch.histogramdd(x, bins=[120, 120], range=[-4.5, 4.5, -4.5, 4.5]).hist  # the points as a 2-D histogram
        save_grid(1 - (hist.T.flip(0) / 2).clamp(max=1)[None, None], out / "samples.png", nrow=1, scale=3)  # dark = dense
        np.savez_compressed(out / "samples.npz", points=x.numpy().astype(np.float32))
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}")
    return results | {"nfe": nfe, "samples": x}


# --- Plumbing (shared helpers, identical in every script; see tests/test_plumbing.py) ---


def dequantize(x, generator=None):  # uint8 (B, ...) -> y = (x + u) / 256 in (0, 1), u ~ U[0, 1) (Eq. 3.13)
    u = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return (x.float() + u.to(x.device)) / 256


def bits_per_dim(log_prob_y, dim):
    """Eq. 3.15: -log P(x) <= -log p(y) + D log 256 nats (Eq. 3.14) for the 8-bit image x, per dimension, in bits."""
    return (-log_prob_y + dim * math.log(256)) / (dim * math.log(2))


def parse_config(config_cls, argv=None):
    """Command-line flags from the dataclass fields: --batch-size 64, --amp / --no-amp.
    The help text of each flag is the field's trailing comment. Bad values exit with one message."""
    defaults = config_cls()
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        source = ""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.MULTILINE))
    hints = typing.get_type_hints(config_cls)
    parser = argparse.ArgumentParser(description=(sys.modules[config_cls.__module__].__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, " ")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name), help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=getattr(defaults, f.name), help=help_text)
    args = vars(parser.parse_args(argv))
    for name, low in [("steps", 0), ("batch_size", 1), ("num_samples", 1), ("log_every", 1)]:
        if name in args and args[name] < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {args[name]}")
    if "lr" in args and not args["lr"] > 0:
        parser.error(f"--lr must be positive, got {args['lr']}")
    if "device" in args and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args["device"]):
        parser.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args['device']!r}")
    try:
        return config_cls(**args)
    except ValueError as e:  # a Config may check its own fields in __post_init__
        parser.error(str(e))


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but CUDA is not available here (try --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for, but MPS is not available here (try --device cpu)")
    return device


MNIST_FILES = {  # name: (official MD5 of the gzipped file, IDX magic number, shape after the count)
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 2051, (28, 28)),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", 2049, ()),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", 2051, (28, 28)),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", 2049, ()),
}
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]


def load_mnist(data_dir, train=True):
    """MNIST as (images uint8 (N, 28, 28), labels int64 (N,)) from <data_dir>/mnist, where each of the
    four IDX files may be gzipped (name.gz) or raw (name). Missing files are downloaded and checked
    against the official MD5; every file is checked for its IDX magic number and size."""
    folder = Path(data_dir) / "mnist"
    prefix = "train" if train else "t10k"
    arrays = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        md5, magic, shape = MNIST_FILES[name]
        path = next((p for p in (folder / (name + ".gz"), folder / name) if p.exists()), None)
        if path is None:
            path = _download_mnist_file(folder, name + ".gz", md5)
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError) as e:
            raise SystemExit(f"error: {path} is not a valid gzip file ({e}); delete it and run again to re-download")
        header = 4 + 4 * (1 + len(shape))
        if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
            raise SystemExit(f"error: {path} is not an MNIST IDX file (expected magic number {magic})")
        count, *dims = struct.unpack(f">{1 + len(shape)}I", data[4:header])
        if tuple(dims) != shape or len(data) != header + count * math.prod(shape):
            raise SystemExit(f"error: {path} is truncated or corrupt: header says {count} x {tuple(dims)}, "
                             f"file holds {len(data) - header} bytes of data; delete it and run again")
        arrays.append(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(count, *shape))
    images, labels = arrays
    if len(images) != len(labels):
        raise SystemExit(f"error: {folder} has {len(images)} {prefix} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _download_mnist_file(folder, filename, md5):
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + filename, timeout=30) as response:
                data = response.read()
        except OSError as e:
            errors.append(f"{mirror}: {e}")
            continue
        if hashlib.md5(data).hexdigest() != md5:
            errors.append(f"{mirror}: MD5 mismatch")
            continue
        tmp = folder / (filename + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, folder / filename)
        print(f"downloaded {filename} from {mirror}")
        return folder / filename
    names = ", ".join(n + ".gz" for n in MNIST_FILES)
    raise SystemExit(f"error: could not download {filename} ({'; '.join(errors)}).\n"
                     f"Put the four MNIST files ({names}) in {folder}/, or point --data-dir "
                     f"(or GENAI_DATA_DIR) at a folder whose mnist/ subfolder holds them.")


def save_grid(images, path, nrow=8, scale=2):
    """Save a (N, C, H, W) tensor with values in [0, 1] as a PNG grid, 2-pixel gaps, upscaled."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.ones(c, rows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = images[i]
    array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_checkpoint(path, state):
    """Write atomically: a temporary file, then os.replace, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by save_checkpoint (tensors, numbers, strings only)."""
    if not Path(path).exists():
        raise SystemExit(f"error: no checkpoint at {path}; train first (without --resume / --sample-only)")
    return torch.load(path, map_location=device, weights_only=True)


def toy_2d(name, n, generator=None):
    """n points (float32, (n, 2)) from a 2-D toy distribution, generated (never downloaded) with the
    given torch.Generator. The exact densities of 8gaussians and checkerboard are in toy_2d_log_prob.
      moons        two interleaved half circles (radius 1, Gaussian noise std 0.1), centred, scaled by 2
      8gaussians   equal mixture of 8 Gaussians, std s = sqrt(2)/4 = 0.354, centres 2 sqrt(2) (cos, sin)(k pi/4)
      swissroll    (t cos t, t sin t) / 5 with t uniform in [1.5 pi, 4.5 pi], plus Gaussian noise std 0.2
      checkerboard uniform on the 8 black squares of a 4 x 4 board of unit squares on [-2, 2]^2, the
                   square [i, i+1) x [j, j+1) being black when i + j is even
      rings        4 concentric circles of radii 0.5, 1, 1.5, 2 (one chosen uniformly), noise std 0.08"""
    def uniform(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if name == "moons":
        t = math.pi * uniform(n)
        upper = uniform(n) < 0.5
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        points = 2 * (torch.stack([x, y], 1) + 0.1 * normal(n, 2) - torch.tensor([0.5, 0.25], dtype=torch.float64))
    elif name == "8gaussians":
        angle = torch.randint(8, (n,), generator=generator).double() * math.pi / 4
        centres = 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)
        points = centres + math.sqrt(2) / 4 * normal(n, 2)
    elif name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * uniform(n))
        points = torch.stack([t * t.cos(), t * t.sin()], 1) / 5 + 0.2 * normal(n, 2)
    elif name == "checkerboard":
        cell = torch.randint(8, (n,), generator=generator)  # which black square
        i = cell // 2  # column of the square, 0..3 (i.e. x in [i - 2, i - 1))
        j = 2 * (cell % 2) + i % 2  # row 0..3 with i + j even
        points = torch.stack([i, j], 1).double() - 2 + uniform(n, 2)
    elif name == "rings":
        radius = 0.5 * (1 + torch.randint(4, (n,), generator=generator)).double()
        angle = 2 * math.pi * uniform(n)
        points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.08 * normal(n, 2)
    else:
        raise ValueError(f"unknown toy data {name!r}: use moons, 8gaussians, swissroll, checkerboard or rings")
    return points.float()


def toy_2d_log_prob(name, x):
    """The exact log density of toy_2d(name, ...) at points x (N, 2), in nats, float64 (N,); defined
    for 8gaussians (a log-sum-exp over the 8 components) and checkerboard (log 1/8 on a black
    square, -inf elsewhere). Same constants as toy_2d."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if name == "8gaussians":
        angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
        centres = 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)  # (8, 2)
        var = (math.sqrt(2) / 4) ** 2
        log_normal = -((x[:, None, :] - centres) ** 2).sum(-1) / (2 * var) - math.log(2 * math.pi * var)  # (N, 8)
        return torch.logsumexp(log_normal, 1) - math.log(8)
    if name == "checkerboard":
        cell = x.floor()
        inside = ((x >= -2) & (x < 2)).all(1)
        black = (cell.sum(1) % 2) == 0
        return torch.where(inside & black, torch.full_like(x[:, 0], -math.log(8)), torch.full_like(x[:, 0], -math.inf))
    raise ValueError(f"no exact log density for {name!r}: only 8gaussians and checkerboard have one")


# --- Main ---


def main(argv=None):
    cfg = parse_config(Config, argv)
    return train(cfg)


if __name__ == "__main__":
    main()
