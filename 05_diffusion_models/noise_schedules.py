"""
Noise schedules and parameterizations: linear, cosine and sigmoid schedules; eps-, x0- and v-prediction, on MNIST.

Papers: Nichol and Dhariwal, 2021, arXiv 2102.09672 (cosine); Chen, 2023, arXiv 2301.10972, and Jabri, Fleet and Chen,
2023, arXiv 2212.11972 (sigmoid); Salimans and Ho, 2022, arXiv 2202.00512 (v-prediction); titles in the README.

The idea: read a schedule through SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Ho et al.'s linear betas spend 30 % of the chain
at log-SNR < -5, where the digit is gone; cosine and sigmoid spread the steps over the noise levels. eps, x0 and v are one
denoiser in three units, but each regression weights the noise levels differently; one run of each, compared on the same x_T.

    log-SNR(t) = log(alpha_bar_t / (1 - alpha_bar_t))                                          (README Eq. 6.1)
    cosine: alpha_bar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2), s = 0.008   (Eq. 6.3)
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0;  x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v   (Eq. 6.7, 6.8)
    ||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR,  ||v_hat - v||^2 = (1 + SNR) ||x0_hat - x0||^2        (Eq. 6.10)
Run:   python 05_diffusion_models/noise_schedules.py           (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 05_diffusion_models/noise_schedules.py --steps 350 --batch-size 64 --lr 1e-3 --channels 16 --attn-res= --num-res-blocks 1 --ema-decay 0.999 --log-every 175
Measured on a 2-core CPU: 11 min 27 s (wall, whole command), five runs of 350 steps; FID at N = 1000 (metrics.py): linear/eps 371.918, cosine/eps 362.878, sigmoid/eps 299.819, cosine/x0 142.322, cosine/v 191.862;
confident (p > 0.9) 43.1, 42.9, 46.0, 53.5, 49.5 % in the same order; x0-MSE yardsticks and losses in README section 6.
Writes out/noise_schedules/: schedules.svg, samples.png (a row per run, same x_T per column), samples_<run>.npz, ckpt_<run>.pt.
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
    seed: int = 0  # random seed (torch, numpy): every run starts from the same weights and sees the same batches and x_T
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA (the network only; schedules, losses and sampler stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/noise_schedules"  # schedules.svg, one checkpoint and samples file per run, samples.png
    runs: str = "linear:eps,cosine:eps,sigmoid:eps,cosine:x0,cosine:v"  # comma-separated schedule:parameterization pairs (linear | cosine | sigmoid : eps | x0 | v)
    steps: int = 4000  # optimizer steps per run
    batch_size: int = 128  # images per step
    lr: float = 2e-4  # Adam learning rate (Ho et al.: 2e-4 on CIFAR-10)
    channels: int = 64  # U-Net width at 28 x 28; level k has channels * mult[k]
    channel_mult: str = "1,2,2"  # comma-separated width multipliers, one per resolution 28, 14, 7
    attn_res: str = "14"  # comma-separated resolutions with self-attention in their blocks ("" for none); the middle block at the lowest resolution always has it
    num_res_blocks: int = 2  # residual blocks per resolution on the way down (one more on the way up)
    dropout: float = 0.0  # dropout inside the residual blocks (Ho et al.: 0.1 on CIFAR-10)
    timesteps: int = 1000  # T, the length of the chain, for every schedule
    ema_decay: float = 0.9995  # EMA of the weights used for sampling, with warm-up min(decay, (1 + n) / (10 + n))
    grad_clip: float = 1.0  # clip the gradient norm (Ho et al.: 1.0)
    sample_steps: int = 50  # S, DDIM steps (eta = 0) from t = T to 0: network calls per sample
    clip: bool = True  # clip x0_hat to [-1, 1] at each sampling step (eps re-derived from it), as ddpm.py does
    test_images: int = 500  # MNIST test digits (the first N) for the x0-MSE yardstick
    num_samples: int = 1000  # samples written per run (S network calls each)
    log_every: int = 1000  # steps between loss reports and checkpoints
    sample_only: bool = False  # skip training; sample from each run's checkpoint in out_dir
    resume: bool = False  # continue each run from its checkpoint in out_dir

    def __post_init__(self):  # a bad value ends in one message: parse_config turns the ValueError into an error exit
        if not (self.timesteps >= 21 and 1 <= self.sample_steps <= self.timesteps and self.grad_clip > 0 and 0 <= self.dropout < 1
                and 0 <= self.ema_decay < 1 and min(self.channels, self.num_res_blocks, self.test_images) >= 1):
            raise ValueError("need --timesteps >= 21 (so linear beta_T = 20 / T < 1); 1 <= --sample-steps <= --timesteps; "
                             "--grad-clip > 0; --dropout, --ema-decay in [0, 1); --channels, --num-res-blocks, --test-images >= 1")
        mult = ints(self.channel_mult) if re.fullmatch(r"[\d,]*", self.channel_mult + self.attn_res) else ()
        if not (mult and len(mult) <= 3 and min(mult) >= 1 and set(ints(self.attn_res)) <= {28 >> k for k in range(len(mult))}):
            raise ValueError(f"--channel-mult takes 1 to 3 comma-separated positive integers (resolutions 28, 14, 7), --attn-res "
                             f"some of those resolutions; got {self.channel_mult!r} and {self.attn_res!r}")
        runs = self.runs.split(",")
        if len(set(runs)) < len(runs) or not set(runs) <= {f"{s}:{p}" for s in SCHEDULES for p in PARAMETERIZATIONS}:
            raise ValueError(f"--runs takes distinct comma-separated schedule:parameterization pairs, schedule in {list(SCHEDULES)} "
                             f"and parameterization in {list(PARAMETERIZATIONS)}, got {self.runs!r}")


def ints(text):  # "1,2,2" -> (1, 2, 2); "" -> ()
    return tuple(int(s) for s in text.split(",") if s.strip())


# --- Model ---


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step t (as the Transformer's positions): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], 1)


def norm(c):
    """GroupNorm with 8 groups (Ho et al. use 32 groups at 128 channels; 8 suits these narrower nets)."""
    return nn.GroupNorm(math.gcd(8, c), c)


class Attention(nn.Module):
    """Single-head self-attention over the H * W positions, added back to the input."""

    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # each (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the embedding of (t, y) as a per-channel shift, GroupNorm-SiLU-dropout-conv,
    added to the input (through a 1 x 1 conv when the width changes); optional self-attention after."""

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, attention=False):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.dropout, self.conv2 = norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (as in Ho et al.'s code)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attention else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, emb_dim) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): an image-to-image network whose resolution halves at each level of channel_mult
    on the way down and doubles back on the way up, with every down-path output fed to the up path (skip
    connections). t (and a class y, when num_classes > 0) enter every residual block as an embedding. The
    index y = num_classes is the "no label" class, so guidance can ask for an unconditional prediction."""

    def __init__(self, in_channels=1, channels=64, channel_mult=(1, 2, 2), attn_resolutions=(14,), image_size=28,
                 num_res_blocks=2, dropout=0.0, num_classes=0):
        super().__init__()
        emb_dim = 4 * channels
        self.channels, self.num_classes = channels, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, channels * mult, emb_dim, dropout, res in attn_resolutions))
                c = channels * mult
                skips.append(c)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample: 28 -> 14 -> 7
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, attention=True), ResBlock(c, c, emb_dim, dropout)])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), channels * mult, emb_dim, dropout, res in attn_resolutions))
                c = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c, c, 3, padding=1)))  # upsample
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # predict eps = 0 at initialization
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):  # (B, C, H, W), (B,) steps in 1..T, (B,) labels or None -> (B, C, H, W)
        emb = self.time_mlp(timestep_embedding(t, self.channels))  # (B, 4 * channels)
        if self.class_emb is not None:
            emb = emb + self.class_emb(torch.full_like(t, self.num_classes) if y is None else y)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)


# --- The method ---


def linear_betas(T):
    """Ho et al.'s schedule, beta_t linear from 1e-4 to 0.02 at T = 1000, both ends scaled by 1000 / T so that a
    shorter chain destroys the signal as fully (README Eq. 1.6). Indexed by the step: betas[t] for t = 1..T, and
    betas[0] = 0 stands for "no noise yet". Float64, (T + 1,)."""
    scale = 1000 / T
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)])


def betas_from_alpha_bar(ab):
    """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped at 0.999, betas[0] = 0 (README Eq. 6.4): (T + 1,) -> (T + 1,). Without
    the clip, alpha_bar_T = 0 gives beta_T = 1, SNR(T) = 0 and x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) = 0 / 0."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), (1 - ab[1:] / ab[:-1]).clamp(max=0.999)])


def cosine_betas(T, s=0.008):
    """Nichol and Dhariwal's schedule (README Eq. 6.3); the offset s keeps beta_1 large enough for 8-bit pixels to notice."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return betas_from_alpha_bar(f / f[0])


def sigmoid_betas(T, start=-3.0, end=3.0, tau=1.0):
    """Jabri et al.'s and Chen's schedule with their defaults (README Eq. 6.6): alpha_bar(t / T) a logistic curve from 1 to 0."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    v_start, v_end = torch.sigmoid(torch.tensor([start, end], dtype=torch.float64) / tau)
    return betas_from_alpha_bar((v_end - torch.sigmoid((start + (end - start) * u) / tau)) / (v_end - v_start))


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
LEVELS = (-6.0, -3.0, 0.0, 3.0, 6.0)  # log-SNR levels of the yardstick (Eq. 6.11), inside every schedule's range at T = 1000


def alpha_bar(betas):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), alpha_bar_0 = 1 (README Eq. 1.3): (T + 1,) -> (T + 1,)."""
    return torch.cumprod(1 - betas, 0)


def log_snr(ab):
    """log SNR = log(alpha_bar / (1 - alpha_bar)) (README Eq. 6.1); +inf at t = 0."""
    return torch.log(ab) - torch.log1p(-ab)


# x0, eps and v from one another, given x_t and ab = alpha_bar_t shaped to broadcast (README Eq. 6.7, 6.8; section 2, Eq. 2.11)
eps_to_x0 = lambda xt, eps, ab: (xt - (1 - ab).sqrt() * eps) / ab.sqrt()  # noqa: E731
x0_to_eps = lambda xt, x0, ab: (xt - ab.sqrt() * x0) / (1 - ab).sqrt()  # noqa: E731
v_to_x0 = lambda xt, v, ab: ab.sqrt() * xt - (1 - ab).sqrt() * v  # noqa: E731
v_to_eps = lambda xt, v, ab: (1 - ab).sqrt() * xt + ab.sqrt() * v  # noqa: E731
x0_eps_to_v = lambda x0, eps, ab: ab.sqrt() * eps - (1 - ab).sqrt() * x0  # noqa: E731  the velocity of x_t along the circle
PARAMETERIZATIONS = {  # what the network predicts -> (x0, eps) given x_t and alpha_bar
    "eps": lambda xt, out, ab: (eps_to_x0(xt, out, ab), out),
    "x0": lambda xt, out, ab: (out, x0_to_eps(xt, out, ab)),
    "v": lambda xt, out, ab: (v_to_x0(xt, out, ab), v_to_eps(xt, out, ab)),
}


def per_sample(c, x):
    """A per-sample coefficient (B,) (or a scalar) shaped (B, 1, 1, 1) to broadcast against x, in x's dtype."""
    return c.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def q_sample(x0, t, eps, betas):
    """x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I), drawn as sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Eq. 1.4)."""
    ab = alpha_bar(betas)[t]
    return per_sample(ab.sqrt(), x0) * x0 + per_sample((1 - ab).sqrt(), x0) * eps


def ddim_step(xt, eps, ab_t, ab_prev, eta, noise):
    """One DDIM update from step t to an earlier step, given the predicted noise eps (README section 4):
    x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps
    + sigma noise, sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev). eta = 0 is deterministic
    and, run towards more noise (ab_prev < ab_t), is DDIM inversion; eta = 1 at consecutive steps is DDPM's step
    with sigma_t^2 = beta_tilde_t. ab_t, ab_prev: alpha_bar at the two steps, shaped to broadcast against xt."""
    x0_hat = (xt - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()  # 0 when inverting
    return ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).sqrt() * eps + sigma * noise


class Diffusion(nn.Module):
    """A schedule (betas, a buffer) and a parameterization (what the output means); the network is an argument."""

    def __init__(self, schedule="linear", param="eps", timesteps=1000):
        super().__init__()
        self.T, self.schedule, self.param = timesteps, schedule, param
        self.register_buffer("betas", SCHEDULES[schedule](timesteps).float())  # float32, so MPS (no float64) works too

    def loss(self, model, x0, t=None, eps=None, per_image=False):
        """MSE against the target eps, x0 or v per dimension (Eq. 6.9), t ~ U{1..T} and eps ~ N(0, I) unless given; (B,) if per_image."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        ab = per_sample(alpha_bar(self.betas)[t], x0)
        target = {"eps": eps, "x0": x0, "v": x0_eps_to_v(x0, eps, ab)}[self.param]
        error = (model(q_sample(x0, t, eps, self.betas), t).to(x0.dtype) - target).pow(2).flatten(1).mean(1)  # (B,)
        return error if per_image else error.mean()

    def predict(self, model, xt, t, clip=False):
        """(x0_hat, eps_hat) from the network's output at (x_t, t), t (B,) (Eq. 6.8); clip: x0_hat to [-1, 1], eps_hat from it."""
        ab = per_sample(alpha_bar(self.betas)[t], xt)
        x0, eps = PARAMETERIZATIONS[self.param](xt, model(xt, t).to(xt.dtype), ab)
        return (x0.clamp(-1, 1), x0_to_eps(xt, x0.clamp(-1, 1), ab)) if clip else (x0, eps)

    @torch.no_grad()
    def sample(self, model, xT, S, clip=True):
        """DDIM, eta = 0 (section 4): xT (B, C, H, W) along T = tau_0 > ... > tau_S = 0; alpha_bar_0 = 1, so it returns x0_hat."""
        ab, x = alpha_bar(self.betas), xT
        tau = torch.linspace(self.T, 0, S + 1, dtype=torch.float64).round().long().tolist()
        for t, s in zip(tau[:-1], tau[1:]):
            _, eps = self.predict(model, x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), clip)
            x = ddim_step(x, eps, ab[t], ab[s], 0.0, torch.zeros_like(x))
        return x

    @torch.no_grad()
    def x0_mse(self, model, x0, levels, batch_size=250):
        """The yardstick (Eq. 6.11): per level, x0_hat's MSE per pixel at the step of nearest log-SNR; same noise every run."""
        lam, generator, errors = log_snr(alpha_bar(self.betas.cpu().double()))[1:], torch.Generator().manual_seed(0), []
        for level in levels:
            t, total = int((lam - level).abs().argmin()) + 1, 0.0
            for x in x0.split(batch_size):
                tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
                xt = q_sample(x, tt, torch.randn(x.shape, generator=generator).to(x.device), self.betas)
                total += (self.predict(model, xt, tt)[0] - x).pow(2).sum().item()
            errors.append(total / x0.numel())
        return errors


def ema_update(ema, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)


# --- Training ---


def save_schedules_svg(T, path, width=330, height=230, left=62, top=40):
    """The README's figure, as SVG text: alpha_bar_t (left panel) and log-SNR (right, for t = 1..T, clipped to [-20, 12])
    against t / T, one curve per schedule (at most 300 points each, both ends included), labelled axes, a legend."""
    colours, full, base = {"linear": "#2563EB", "cosine": "#DC2626", "sigmoid": "#059669"}, 2 * (left + width) + 50, top + height
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{full}" height="{base + 80}" viewBox="0 0 {full} {base + 80}" '
             'font-family="Helvetica, Arial, sans-serif" font-size="13">', '<rect width="100%" height="100%" fill="white"/>']
    panels = [("ᾱ_t", 0.0, 1.0, [0, 0.25, 0.5, 0.75, 1], lambda ab: ab), ("log-SNR = log(ᾱ_t / (1 − ᾱ_t))", -20.0, 12.0, range(-20, 13, 4), log_snr)]
    for k, (label, lo, hi, ticks, fn) in enumerate(panels):
        x0, ts = left + k * (left + width + 30), sorted(set(torch.linspace(k, T, 300).round().long().tolist()))  # t = k..T
        px, py = lambda u: x0 + u * width, lambda y: top + (hi - min(max(y, lo), hi)) / (hi - lo) * height  # noqa: E731
        parts += [f'<rect x="{x0}" y="{top}" width="{width}" height="{height}" fill="#F8FAFC" stroke="#CBD5E1"/>',
                  f'<text x="{x0 + width / 2}" y="{base + 36}" text-anchor="middle" fill="#1E293B">t / T</text>',
                  f'<text x="{x0 + width / 2}" y="{top - 12}" text-anchor="middle" fill="#1E293B">{label}</text>']
        parts += [f'<line x1="{x0}" y1="{py(y):.1f}" x2="{x0 + width}" y2="{py(y):.1f}" stroke="#E2E8F0"/>\n<text x="{x0 - 6}" '
                  f'y="{py(y) + 4:.1f}" text-anchor="end" fill="#475569" font-size="11">{y:g}</text>' for y in ticks]
        parts += [f'<text x="{px(u):.1f}" y="{base + 16}" text-anchor="middle" fill="#475569" font-size="11">{u:g}</text>'
                  for u in (0, 0.25, 0.5, 0.75, 1)]
        for name, colour in colours.items():  # alpha_bar from t = 0, log-SNR from t = 1 (it is +inf at t = 0)
            points = " ".join(f"{px(t / T):.1f},{py(y):.1f}" for t, y in zip(ts, fn(alpha_bar(SCHEDULES[name](T)))[ts].tolist()))
            parts.append(f'<polyline class="{name}" points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
    for x, (name, colour) in zip(range(left, full, 150), colours.items()):  # the legend, under both panels
        parts += [f'<line x1="{x}" y1="{base + 60}" x2="{x + 24}" y2="{base + 60}" stroke="{colour}" stroke-width="3"/>',
                  f'<text x="{x + 30}" y="{base + 64}" fill="#1E293B">{name}</text>']
    parts.append(f'<text x="{full - 10}" y="{base + 64}" text-anchor="end" fill="#475569" font-size="11">T = {T}</text>')
    Path(path).write_text("\n".join(parts + ["</svg>"]) + "\n")


def fit(cfg, schedule, param, x_train, x_test, xT, device, out):
    """One run: train (or load) a U-Net, then the yardstick and samples of its EMA weights. Returns (figures, 10 samples)."""
    torch.manual_seed(cfg.seed)  # every run: the same initial weights, batches, steps t and noise draws
    model = UNet(1, cfg.channels, ints(cfg.channel_mult), ints(cfg.attn_res), 28, cfg.num_res_blocks, cfg.dropout).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    amp = torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda")  # bf16: the network only
    train_net, ema_net = amp(lambda xt, t: model(xt, t).float()), amp(lambda xt, t: ema(xt, t).float())
    diffusion, optimizer = Diffusion(schedule, param, cfg.timesteps).to(device), torch.optim.Adam(model.parameters(), lr=cfg.lr)
    parts, path = {"model": model, "ema": ema, "optimizer": optimizer}, out / f"ckpt_{schedule}_{param}.pt"
    ckpt = load_checkpoint(path, device) if cfg.resume or cfg.sample_only else None
    for key, part in parts.items() if ckpt else []:
        part.load_state_dict(ckpt[key])
    step = ckpt["step"] if ckpt else 0

    def checkpoint():  # the state of every part, the config and the step, as ckpt_<schedule>_<param>.pt
        save_checkpoint(path, {key: part.state_dict() for key, part in parts.items()} | {"config": asdict(cfg), "step": step})
    t0, running, last_loss = time.time(), [], float("nan")
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc=f"{schedule}:{param}")
    try:
        while step < cfg.steps and not cfg.sample_only:
            x0 = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]  # 1. a random batch of training digits
            loss = diffusion.loss(train_net, x0)  # 2. noised to random steps t; regress this run's target (Eq. 6.9)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step} of {schedule}:{param}; the last good checkpoint is {path}")
            optimizer.zero_grad(set_to_none=True)  # 3. one gradient step (norm clipped), then the EMA follows with a warm-up
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            running.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{running[-1]:.4f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"{schedule}:{param} step {step}: {param}-MSE {np.mean(running):.4f} (mean of {len(running)} steps)")
                last_loss, running = float(np.mean(running)), []
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step} of {schedule}:{param}; checkpoint saved to {path}")
    bar.close()
    result = {"step": step, "loss": last_loss, "train_time": time.time() - t0, "x0_mse": diffusion.x0_mse(ema_net, x_test, LEVELS)}
    t0 = time.time()  # then sample 250 at a time, as ddpm.py: (N, 1, 28, 28) in [0, 1]
    samples = torch.cat([((diffusion.sample(ema_net, x, cfg.sample_steps, cfg.clip) + 1) / 2).clamp(0, 1).cpu()
                         for x in xT.split(250)])
    result["sample_time"] = time.time() - t0
    np.savez_compressed(out / f"samples_{schedule}_{param}.npz", images=(samples * 255).round().byte().numpy())
    checkpoint()
    print(f"{schedule}:{param}: x0-MSE at log-SNR {LEVELS}: {' '.join(f'{e:.4f}' for e in result['x0_mse'])}, mean "
          f"{np.mean(result['x0_mse']):.4f}; {result['train_time']:.0f} s training, {result['sample_time']:.0f} s sampling")
    return result, samples[:10]


def train(cfg):
    np.random.seed(cfg.seed)  # (torch is seeded at the start of each run)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_schedules_svg(cfg.timesteps, out / "schedules.svg")
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    x_test = load_mnist(cfg.data_dir, train=False)[0][:cfg.test_images].to(device).float().div(127.5).sub(1).unsqueeze(1)
    xT = torch.randn((cfg.num_samples, 1, 28, 28), generator=torch.Generator().manual_seed(cfg.seed)).to(device)  # one x_T for all runs
    runs = {run: fit(cfg, *run.split(":"), x_train, x_test, xT, device, out) for run in cfg.runs.split(",")}  # (figures, samples)
    save_grid(torch.cat([first for _, first in runs.values()]), out / "samples.png", nrow=10)  # a row of 10 per run
    print(f"wrote {out}: schedules.svg, samples.png, samples_<schedule>_<param>.npz (score each with python 02_gans/metrics.py)")
    return {run: figures for run, (figures, _) in runs.items()}


# --- Plumbing (shared helpers, identical in every script; see tests/test_plumbing.py) ---


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


# --- Main ---


def main(argv=None):
    return train(parse_config(Config, argv))


if __name__ == "__main__":
    main()
