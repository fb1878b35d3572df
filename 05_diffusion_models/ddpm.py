"""
DDPM: denoising diffusion probabilistic models, the course's flagship, on MNIST.

Paper: Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv 2006.11239. Network: a U-Net (Ronneberger,
Fischer and Brox, 2015, arXiv 1505.04597) in Ho et al.'s PixelCNN++ form (GroupNorm, sinusoidal time embedding, self-attention).

The idea: a fixed forward process adds a little Gaussian noise at each of T = 1000 steps until a digit is pure noise; a network
learns to undo one step. Every q(x_t | x0) is Gaussian in closed form, so training noises a digit to a random step t and regresses
the noise (Algorithm 1); sampling walks back from N(0, I), one network call per step (Algorithm 2), with an EMA of the weights.

    q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)                       (README Eq. 1.4)
    q(x_{t-1} | x_t, x0) = N(mu_tilde_t(x_t, x0), beta_tilde_t I)                     (README Eq. 2.4, 2.5)
    L_simple = E_{t, x0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2   (Eq. 2.13)
    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z   (Eq. 3.1)

Run:   python 05_diffusion_models/ddpm.py                       (defaults sized for one GPU; see the measured H200 run below)
       python 05_diffusion_models/ddpm.py --sample-only --eval-nll   (test NLL bound in bits/dim)
CPU recipe: python 05_diffusion_models/ddpm.py --amp --steps 3800 --batch-size 128 --lr 2e-3 --channels 16 --attn-res= --num-res-blocks 1 --ema-decay 0.999 --log-every 500
Measured on a 2-core CPU with AVX-512 BF16 (--amp there: bf16 autocast, a training step 1.9x faster than float32): 25 min 10 s
(wall, whole command) = training 14 min 48 s (888 s; final L_simple 0.0242) + sampling 1000 images x 1000 steps 10 min 17 s;
FID 15.2 (N = 1000), 85.4 % confident, every class >= 7.8 %: recognizable digits; with --sample-only --eval-nll: test NLL
bound 2.141 bits/dim on N = 100 test digits in 82 s. Without bf16 instructions, time a few steps with and without --amp.
Measured on an NVIDIA H200 (--amp): the defaults' first 7490 steps took 352 s to train (13 to 21 steps/s on two machines),
then 1000 samples in 67 s: FID 10.6 (N = 1000), 91.3 % confident, every class >= 7.3 %.
Writes out/ddpm/: ckpt.pt (with "ema"), samples.png, samples.npz, trajectory.png, chain.svg (the README's chain figure).
"""

import argparse
import base64
import copy
import dataclasses
import gzip
import hashlib
import inspect
import io
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
    amp: bool = False  # bf16 autocast on CUDA or CPU (the network only; schedules, loss and sampler stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/ddpm"  # checkpoint, samples and the trajectory strip go here
    steps: int = 7500  # optimizer steps (about 6 to 10 minutes on an H200 with --amp)
    batch_size: int = 128  # images per step
    lr: float = 2e-4  # Adam learning rate (Ho et al.: 2e-4 on CIFAR-10)
    channels: int = 64  # U-Net width at 28 x 28; level k has channels * mult[k]
    channel_mult: str = "1,2,2"  # comma-separated width multipliers, one per resolution 28, 14, 7
    attn_res: str = "14"  # comma-separated resolutions with self-attention in their blocks ("" for none); the middle block at the lowest resolution always has it
    num_res_blocks: int = 2  # residual blocks per resolution on the way down (one more on the way up)
    dropout: float = 0.0  # dropout inside the residual blocks (Ho et al.: 0.1 on CIFAR-10)
    timesteps: int = 1000  # T, the length of the chain; betas are rescaled by 1000 / T (README Eq. 1.6)
    sigma: str = "beta"  # reverse-step variance sigma_t^2: beta (beta_t) | posterior (beta_tilde_t) (README Eq. 3.3)
    clip: bool = True  # clip the predicted x0 to [-1, 1] inside each reverse step (as Ho et al.'s released code does)
    ema_decay: float = 0.9995  # EMA of the weights used for sampling, with warm-up min(decay, (1 + n) / (10 + n))
    grad_clip: float = 1.0  # clip the gradient norm (Ho et al.: 1.0)
    num_samples: int = 1000  # samples written to samples.npz (T network calls each)
    log_every: int = 1000  # steps between loss reports and checkpoints
    eval_nll: bool = False  # also estimate the test NLL bound in bits/dim (README Eq. 2.17; T network calls per image)
    nll_images: int = 100  # test digits (the first N) for --eval-nll
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):  # parse_config turns a ValueError into one usage message
        mult = ints(self.channel_mult) if re.fullmatch(r"[\d,]*", self.channel_mult + self.attn_res) else ()
        res = (28, 14, 7)[:len(mult)]  # the resolutions of the levels: 28 halves at most twice
        rules = {f"--timesteps >= 21, so beta_T = 20 / T < 1 (got {self.timesteps})": self.timesteps >= 21,
                 f"--sigma beta or posterior (got {self.sigma!r})": self.sigma in ("beta", "posterior"),
                 f"--channel-mult: 1 to 3 comma-separated positive integers (got {self.channel_mult!r})":
                     0 < len(mult) <= 3 and min(mult) >= 1,
                 f"--attn-res among {res or (28, 14, 7)} (got {self.attn_res!r})": bool(mult) and set(ints(self.attn_res)) <= set(res),
                 "--ema-decay and --dropout in [0, 1), --grad-clip > 0": 0 <= self.ema_decay < 1 and 0 <= self.dropout < 1
                 and self.grad_clip > 0,
                 "--channels, --num-res-blocks, --nll-images >= 1": min(self.channels, self.num_res_blocks, self.nll_images) >= 1}
        if not all(rules.values()):  # name every rule that is broken
            raise ValueError("need " + "; ".join(rule for rule, ok in rules.items() if not ok))


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


def alpha_bar(betas):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), alpha_bar_0 = 1 (README Eq. 1.3): (T + 1,) -> (T + 1,)."""
    return torch.cumprod(1 - betas, 0)


def per_sample(c, x):
    """A per-sample coefficient (B,) (or a scalar) shaped (B, 1, 1, 1) to broadcast against x, in x's dtype."""
    return c.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def q_sample(x0, t, eps, betas):
    """x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I), drawn as sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Eq. 1.4)."""
    ab = alpha_bar(betas)[t]
    return per_sample(ab.sqrt(), x0) * x0 + per_sample((1 - ab).sqrt(), x0) * eps


def q_posterior(x0, xt, t, betas):
    """Mean and variance of q(x_{t-1} | x_t, x0) for t >= 1 (Eq. 2.4, 2.5): mu_tilde = sqrt(alpha_bar_{t-1}) beta_t /
    (1 - alpha_bar_t) x0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t and beta_tilde = (1 - alpha_bar_{t-1}) /
    (1 - alpha_bar_t) beta_t. The variance comes shaped (B, 1, 1, 1)."""
    ab = alpha_bar(betas)
    ab_t, ab_prev, beta_t = ab[t], ab[t - 1], betas[t]
    mean = per_sample(ab_prev.sqrt() * beta_t / (1 - ab_t), xt) * x0 + per_sample((1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t), xt) * xt
    return mean, per_sample((1 - ab_prev) / (1 - ab_t) * beta_t, xt)


def gaussian_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per dimension, in nats (Eq. 2.9)."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_prob(x, mean, var):
    """log of the probability that N(mean, var) gives to the bin of width 2/255 around x, the pixel values
    x in {-1, -1 + 2/255, ..., 1}; the outer bins reach to -inf and +inf, so the 256 bins sum to 1 (Eq. 2.15)."""
    upper = torch.where(x > 0.999, torch.ones_like(x), torch.special.ndtr((x + 1 / 255 - mean) / var.sqrt()))
    lower = torch.where(x < -0.999, torch.zeros_like(x), torch.special.ndtr((x - 1 / 255 - mean) / var.sqrt()))
    return torch.log((upper - lower).clamp(min=1e-12))


class DDPM(nn.Module):
    """The forward process (a buffer) and what a noise predictor does with it; eps_model is an argument: net, EMA or a test's."""

    def __init__(self, timesteps=1000, sigma="beta", clip=True):
        super().__init__()
        self.T, self.sigma, self.clip = timesteps, sigma, clip
        self.register_buffer("betas", linear_betas(timesteps).float())  # float32, so MPS (no float64) works too

    def loss(self, eps_model, x0):
        """Algorithm 1: t ~ U{1..T}, eps ~ N(0, I), regress eps from x_t; L_simple averaged per dimension (Eq. 2.13)."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        xt = q_sample(x0, t, eps, self.betas)
        return (eps - eps_model(xt, t).to(eps.dtype)).pow(2).mean()

    def p_mean_var(self, eps_model, xt, t):
        """p_theta(x_{t-1} | x_t) = N(mean, var I): the posterior mean at the predicted x0 (Eq. 2.11, 2.12) and
        sigma_t^2 = beta_t or beta_tilde_t (Eq. 3.3), beta_1 at t = 1 either way (beta_tilde_1 = 0). Also returns x0_hat."""
        ab = per_sample(alpha_bar(self.betas)[t], xt)
        x0_hat = (xt - (1 - ab).sqrt() * eps_model(xt, t).to(xt.dtype)) / ab.sqrt()  # Eq. 2.11 solved for x0
        x0_hat = x0_hat.clamp(-1, 1) if self.clip else x0_hat
        mean, posterior_var = q_posterior(x0_hat, xt, t, self.betas)
        var = torch.where((per_sample(t, xt) == 1) | (self.sigma == "beta"), per_sample(self.betas[t], xt), posterior_var)
        return mean, var, x0_hat

    @torch.no_grad()
    def sample(self, eps_model, shape, frames=0):
        """Algorithm 2: x_T ~ N(0, I); for t = T, ..., 1: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), no noise at the
        last step (Eq. 3.1). Also returns `frames` snapshots of sample 0 (x_t, then x0_hat) at evenly spaced t from T to 1."""
        x, snaps = torch.randn(shape, device=self.betas.device), []  # x_T
        keep = set(torch.linspace(self.T, 1, frames).round().long().tolist())
        for t in range(self.T, 0, -1):
            mean, var, x0_hat = self.p_mean_var(eps_model, x, torch.full((shape[0],), t, device=x.device, dtype=torch.long))
            snaps += [(x[0], x0_hat[0])] if t in keep else []
            x = mean + var.sqrt() * torch.randn_like(x) if t > 1 else mean
        return x, [s[0] for s in snaps] + [s[1] for s in snaps]

    @torch.no_grad()
    def nll_bound(self, eps_model, x0, discrete=True):
        """The bound on -log p_theta(x0) in nats per image, as three (B,) parts (Eq. 2.8): L_T = KL(q(x_T | x0) || N(0, I)); the
        sum over t = 2..T of L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)), one x_t ~ q(x_t | x0) per t; and L_0 =
        -log p_theta(x0 | x_1), discretized (Eq. 2.15) or, with discrete=False, Gaussian. T network calls per image."""
        b, ab = x0.shape[0], alpha_bar(self.betas)
        prior_kl = gaussian_kl(ab[-1].sqrt() * x0, (1 - ab[-1]).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))
        steps_kl = torch.zeros(b, dtype=x0.dtype, device=x0.device)
        for t in range(self.T, 0, -1):
            tt = torch.full((b,), t, device=x0.device, dtype=torch.long)
            xt = q_sample(x0, tt, torch.randn_like(x0), self.betas)
            mean, var, _ = self.p_mean_var(eps_model, xt, tt)
            if t > 1:  # at t = 1, mean and var are the decoder's
                steps_kl += gaussian_kl(*q_posterior(x0, xt, tt, self.betas), mean, var).flatten(1).sum(1)
        decoder = (discretized_gaussian_log_prob(x0.double(), mean.double(), var.double()).to(x0.dtype) if discrete
                   else -0.5 * (torch.log(2 * math.pi * var) + (x0 - mean) ** 2 / var))
        return prior_kl.flatten(1).sum(1), steps_kl, -decoder.flatten(1).sum(1)


def ema_update(ema, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)


# --- Training ---


def eval_nll(ddpm, model, x_test, batch_size):
    """Eq. 2.17: the bound in bits per dimension on the given test digits, and its three parts in bits per dimension."""
    parts = sum(torch.stack([p.double().sum().cpu() for p in ddpm.nll_bound(model, x_test[i:i + batch_size])])
                for i in range(0, len(x_test), batch_size)) / (len(x_test) * x_test[0].numel() * math.log(2))
    return parts.sum().item(), parts.tolist()


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)  # save_grid and save_checkpoint create it
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    model = UNet(1, cfg.channels, ints(cfg.channel_mult), ints(cfg.attn_res), 28, cfg.num_res_blocks, cfg.dropout).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    ddpm = DDPM(cfg.timesteps, cfg.sigma, cfg.clip).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        for part, name in [(model, "model"), (ema, "ema"), (optimizer, "optimizer")]:
            part.load_state_dict(ckpt[name])
        step = ckpt["step"]
    print(f"U-Net: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; T = {cfg.timesteps}")

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    def net(m):  # m run in bf16 autocast on CUDA or CPU when asked (autocast as a decorator); DDPM casts its output back to float32
        return torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type in ("cuda", "cpu"))(m)

    t0, running, last_loss = time.time(), [], float("nan")
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="ddpm")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits x0
            x0 = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            # 2. Algorithm 1: noise them to random steps t and regress the noise
            loss = ddpm.loss(net(model), x0)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step (norm clipped), then the EMA copy follows with a warm-up
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            running.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"step {step}: L_simple {np.mean(running):.4f} (mean of the last {len(running)} steps)")
                last_loss, running = float(np.mean(running)), []
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    results = {"step": step, "train_time": time.time() - t0, "loss": last_loss}
    if not cfg.sample_only:
        print(f"trained {step} steps in {results['train_time']:.0f} s")

    eps_model, t0, chunks, frames = net(ema.eval()), time.time(), [], []  # samples from the EMA weights (Algorithm 2)
    for i in range(0, cfg.num_samples, 250):  # 250 at a time: on a CPU, larger batches ran slower per image
        x, snaps = ddpm.sample(eps_model, (min(250, cfg.num_samples - i), 1, 28, 28), frames=10 if i == 0 else 0)
        chunks.append(((x + 1) / 2).clamp(0, 1).cpu())  # [-1, 1] -> [0, 1]
        frames = frames or snaps
    samples = torch.cat(chunks)
    results["sample_time"] = time.time() - t0
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().numpy())
    save_grid((torch.stack(frames) + 1) / 2, out / "trajectory.png", nrow=len(frames) // 2, scale=3)  # top: x_t, bottom: x0_hat
    ts = [0] + sorted(torch.linspace(cfg.timesteps, 1, len(frames) // 2).round().long().tolist())  # the frames' steps, ascending
    forward = [q_sample(x_train[:1], torch.tensor([t], device=device), torch.randn_like(x_train[:1]), ddpm.betas)[0, 0] for t in ts]
    reverse = [samples[0, 0] * 2 - 1] + [f[0] for f in frames[:len(frames) // 2][::-1]]  # final x0, then x_t for t ascending
    save_chain_svg(forward, reverse, ts, out / "chain.svg")
    print(f"{len(samples)} samples in {results['sample_time']:.0f} s; wrote samples.png/.npz, trajectory.png, chain.svg to {out}")

    if cfg.eval_nll:
        x_test = load_mnist(cfg.data_dir, train=False)[0][:cfg.nll_images].to(device).float().div(127.5).sub(1).unsqueeze(1)
        t0 = time.time()
        bpd, (prior, steps_kl, decoder) = eval_nll(ddpm, eps_model, x_test, batch_size=500)
        results.update(nll_bpd=bpd, nll_time=time.time() - t0)
        print(f"test NLL bound on {len(x_test)} digits: {bpd:.3f} bits/dim = L_T {prior:.5f} + L_1..T-1 {steps_kl:.3f} + L_0 "
              f"{decoder:.3f}, in {results['nll_time']:.0f} s ({cfg.timesteps} network calls per image)")
    checkpoint()
    return results


def save_chain_svg(forward, reverse, ts, path, size=56):
    """The README's chain figure, PNGs embedded: forward (a training digit noised by q) over reverse (one sample's trajectory,
    its x0 on the left), each (len(ts), 28, 28) in [-1, 1] at the steps ts, ascending from ts[0] = 0."""
    def png(img):  # (28, 28) in [-1, 1] -> a data URI
        buffer = io.BytesIO()
        Image.fromarray(((img.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    sub = lambda text: f'<tspan baseline-shift="sub" font-size="10">{text}</tspan>'  # noqa: E731
    left, right, w, h = 150, 150 + len(ts) * (size + 8) - 8, 160 + len(ts) * (size + 8), 2 * size + 160  # 8-pixel gaps
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="13">', '<rect width="100%" height="100%" fill="white"/>',
           '<defs><marker id="head" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#1E293B"/></marker></defs>']
    for y, images, title in [(40, forward, f"data: q(x{sub('t')} | x{sub('0')})"),
                             (size + 120, reverse, f"model: p{sub('θ')}(x{sub('t−1')} | x{sub('t')})")]:
        svg.append(f'<text x="10" y="{y + size / 2 + 5}" fill="#1E293B">{title}</text>')
        svg += [f'<image x="{x}" y="{y}" width="{size}" height="{size}" style="image-rendering:pixelated" href="{png(img)}"/>\n'
                f'<text x="{x + size / 2}" y="{y + size + 16}" text-anchor="middle" fill="#475569" font-size="11">t = {t}</text>'
                for x, t, img in zip(range(left, right, size + 8), ts, images)]  # an image and its step, 8 pixels apart
    for x1, x2, y, ty, caption in [(left, right, 24, 16, "forward: add a little Gaussian noise at each step (fixed)"),
                                   (right, left, h - 20, h - 4, "reverse: the network removes it, one step at a time (learned)")]:
        svg += [f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="#1E293B" stroke-width="1.5" marker-end="url(#head)"/>',
                f'<text x="{(left + right) / 2}" y="{ty}" text-anchor="middle" fill="#1E293B">{caption}</text>']
    Path(path).write_text("\n".join(svg + ["</svg>"]) + "\n")


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
