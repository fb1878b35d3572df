"""
DDIM: denoising diffusion implicit models, a fast and deterministic sampler for a trained DDPM, on MNIST.

Paper: Song, Meng and Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, arXiv 2010.02502.
Builds on: Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv 2006.11239 (ddpm.py).

The idea: DDPM's loss only sees the marginals q(x_t | x0), so any forward process with those marginals shares its trained
network. DDIM's non-Markovian one has a reverse step with a free noise scale eta (1: DDPM's ancestral step, 0: deterministic)
on a sub-sequence tau of S of the T training steps (S = 50 network calls, not T = 1000). At eta = 0 it is Euler's method on
the probability-flow ODE, so it runs backwards too (image -> x_T -> image) and its noise is a latent space to interpolate in.

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)                       (README Eq. 4.7)
    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_theta(x_t, t) + sigma z,  s < t  (Eq. 4.8)
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)         (Eq. 4.9)

Model: the EMA weights of a ddpm.py checkpoint (--ckpt, default out/ddpm/ckpt.pt); without one, trains ddpm.py's.
Run:   python 05_diffusion_models/ddim.py                  (S = 50, eta = 0 from ddpm.py's model; H200: 3.3 s, FID 14.1)
       python 05_diffusion_models/ddim.py --eta 1 --sample-steps 1000    (DDPM's sampler with sigma_t^2 = beta_tilde_t)
CPU recipe: python 05_diffusion_models/ddim.py --sweep
Measured on a 2-core CPU on the checkpoint of ddpm.py's earlier float32 recipe (its flags without --amp, --steps 4100 --batch-size 64
--lr 1e-3; T = 1000): 26 min 32 s (wall, whole command);
1000 digits at S = 10, 20, 50, 100, 1000 in 12.9, 28.6, 68.9, 124.4, 1353.3 s, FID 71.9, 52.6, 46.8, 45.5, 44.6 (N = 1000; ddpm.py's
own 1000-step samples: 27.3); inversion of 8 test digits at S = 50: reconstruction RMSE 8.29 (pixel values 0..255).
Writes out/ddim/: samples.png, samples.npz (or samples_<S>.png/.npz for each S of --sweep), inversion.png (rows: test
digit, its x_T, the reconstruction), interpolation.png (one row, slerp between two x_T), ckpt.pt when training.
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
    seed: int = 0  # random seed (torch, numpy); every --sweep setting starts from the same x_T
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA (the network only; schedule, loss and sampler stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/ddim"  # samples, inversion.png, interpolation.png (and ckpt.pt when training) go here
    ckpt: str = "out/ddpm/ckpt.pt"  # a ddpm.py checkpoint; if the file exists its EMA weights are used and nothing is trained ("" to train)
    steps: int = 7500  # optimizer steps, when training (as ddpm.py)
    batch_size: int = 128  # images per step
    lr: float = 2e-4  # Adam learning rate (Ho et al.: 2e-4 on CIFAR-10)
    channels: int = 64  # U-Net width at 28 x 28; level k has channels * mult[k]
    channel_mult: str = "1,2,2"  # comma-separated width multipliers, one per resolution 28, 14, 7
    attn_res: str = "14"  # comma-separated resolutions with self-attention in their blocks ("" for none); the middle block at the lowest resolution always has it
    num_res_blocks: int = 2  # residual blocks per resolution on the way down (one more on the way up)
    dropout: float = 0.0  # dropout inside the residual blocks (Ho et al.: 0.1 on CIFAR-10)
    timesteps: int = 1000  # T, the length of the training chain (a loaded checkpoint brings its own); betas rescaled by 1000 / T
    ema_decay: float = 0.9995  # EMA of the weights used for sampling, with warm-up min(decay, (1 + n) / (10 + n))
    grad_clip: float = 1.0  # clip the gradient norm (Ho et al.: 1.0)
    sample_steps: int = 50  # S, the length of the sub-sequence tau of the T steps: network calls per image (README Eq. 4.10)
    eta: float = 0.0  # noise scale of the DDIM step: 0 deterministic (DDIM), 1 DDPM's posterior variance (README Eq. 4.9)
    skip: str = "uniform"  # the sub-sequence tau: uniform (even gaps) | quadratic (gaps growing with t) (README Eq. 4.11)
    clip: bool = True  # clip x0_hat to [-1, 1] in each sampling step and re-derive eps from it, as ddpm.py does (not when inverting)
    sweep: bool = False  # sample once for each S in --sweep-steps, timing each
    sweep_steps: str = "10,20,50,100,1000"  # comma-separated S values for --sweep (clipped to T)
    num_samples: int = 1000  # samples written per setting (S network calls each, 250 images per batch)
    log_every: int = 1000  # steps between loss reports and checkpoints, when training
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt (a model this script trained)
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.timesteps < 21 or self.sample_steps < 1 or not self.eta >= 0 or self.skip not in ("uniform", "quadratic"):
            raise ValueError(f"need --timesteps >= 21 (so the rescaled beta_T = 20 / T < 1), --sample-steps >= 1, --eta >= 0, "
                             f"--skip uniform or quadratic; got {self.timesteps}, {self.sample_steps}, {self.eta}, {self.skip!r}")
        if not re.fullmatch(r"[\d,]*", self.channel_mult + self.attn_res) or not re.fullmatch(r"\d+(,\d+)*", self.sweep_steps):
            raise ValueError(f"--channel-mult, --attn-res and --sweep-steps take comma-separated integers, "
                             f"got {self.channel_mult!r}, {self.attn_res!r} and {self.sweep_steps!r}")
        mult, attn = ints(self.channel_mult), ints(self.attn_res)
        if not mult or len(mult) > 3 or min(mult) < 1 or self.channels < 1 or self.num_res_blocks < 1:
            raise ValueError("need 1 to 3 positive --channel-mult entries (28 halves twice: 28, 14, 7), --channels >= 1, --num-res-blocks >= 1")
        if not set(attn) <= {28 >> k for k in range(len(mult))}:
            raise ValueError(f"--attn-res must be among the resolutions {[28 >> k for k in range(len(mult))]}, got {self.attn_res!r}")
        if not (0 <= self.ema_decay < 1 and 0 <= self.dropout < 1 and self.grad_clip > 0) or 0 in ints(self.sweep_steps):
            raise ValueError("need 0 <= --ema-decay < 1, 0 <= --dropout < 1, --grad-clip > 0 and no 0 in --sweep-steps")


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


def ddim_step(xt, eps, ab_t, ab_prev, eta, noise):
    """One DDIM update from step t to an earlier step, given the predicted noise eps (README section 4):
    x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps
    + sigma noise, sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev). eta = 0 is deterministic
    and, run towards more noise (ab_prev < ab_t), is DDIM inversion; eta = 1 at consecutive steps is DDPM's step
    with sigma_t^2 = beta_tilde_t. ab_t, ab_prev: alpha_bar at the two steps, shaped to broadcast against xt."""
    x0_hat = (xt - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()  # 0 when inverting
    return ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).sqrt() * eps + sigma * noise


def sub_sequence(T, S, skip="uniform"):
    """The steps tau a chain of S network calls visits, from T down to 1, then 0 (README Eq. 4.10, 4.11):
    tau_i = i + round((T - S) f((i - 1) / (S - 1))) for i = 1..S, f(u) = u (uniform: even gaps) or u^2 (quadratic: small
    gaps near the data, large ones near the noise). The "+ i" keeps the steps distinct, so S = T visits every step."""
    u = torch.linspace(0, 1, S, dtype=torch.float64) if S > 1 else torch.ones(1, dtype=torch.float64)
    tau = torch.arange(1, S + 1) + torch.floor((T - S) * (u if skip == "uniform" else u ** 2) + 0.5).long()
    return tau.flip(0).tolist() + [0]


class DDIM(nn.Module):
    """DDPM's schedule (a buffer) and the DDIM sampler. The loss is DDPM's L_simple: the non-Markovian process has the
    same marginals (README Eq. 4.5). The network is an argument, so a checkpoint or the tests' closed form can drive it."""

    def __init__(self, timesteps=1000):
        super().__init__()
        self.T = timesteps
        self.register_buffer("betas", linear_betas(timesteps).float())  # float32 as in ddpm.py (MPS has no float64)

    def loss(self, eps_model, x0):
        """Ho et al.'s Algorithm 1, L_simple per dimension (section 2, Eq. 2.13): t ~ U{1..T}, regress eps from x_t."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return (eps - eps_model(q_sample(x0, t, eps, self.betas), t).to(eps.dtype)).pow(2).mean()

    def eps_at(self, eps_model, x, t, clip):  # eps_theta(x, t) for a whole batch at the step t; clipped as ddpm.py clips
        ab = alpha_bar(self.betas)[t]
        eps = eps_model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        x0_hat = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)  # clip: then the eps that this x0_hat implies
        return (x - ab.sqrt() * x0_hat) / (1 - ab).sqrt() if clip else eps

    @torch.no_grad()
    def sample(self, eps_model, xT, S, eta=0.0, skip="uniform", clip=False):
        """The generative process along tau (README Eq. 4.10): from x_T = xT (B, C, H, W), one network call and one
        ddim_step per step of tau; the last step lands on t = 0, where alpha_bar = 1, and so returns x0_hat."""
        ab, tau, x = alpha_bar(self.betas), sub_sequence(self.T, S, skip), xT
        for t, s in zip(tau[:-1], tau[1:]):
            x = ddim_step(x, self.eps_at(eps_model, x, t, clip), ab[t], ab[s], eta, torch.randn_like(x))
        return x

    @torch.no_grad()
    def invert(self, eps_model, x0, S, skip="uniform"):
        """DDIM inversion (README Eq. 4.13): the eta = 0 step run up the same tau, x0 (B, C, H, W) -> x_T. The exact inverse
        of t -> s needs eps_theta at the unknown x_t; this uses the known x_s (with step t): Euler's method run backwards."""
        ab, tau, x = alpha_bar(self.betas), sub_sequence(self.T, S, skip)[::-1], x0
        for s, t in zip(tau[:-1], tau[1:]):
            x = ddim_step(x, self.eps_at(eps_model, x, t, False), ab[s], ab[t], 0.0, torch.zeros_like(x))
        return x


def slerp(z0, z1, alpha):
    """Spherical interpolation of two noises at the fraction alpha in [0, 1] (Shoemake, 1985; Song et al., section 5.3). Noise
    in D dimensions lies near the sphere of radius sqrt(D), where slerp stays; a straight line's midpoint is off it."""
    theta = torch.arccos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def ema_update(ema, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)


# --- Training ---


def load_ddpm(path, device):
    """The EMA network of a ddpm.py (or ddim.py) checkpoint, built from the checkpoint's own config: (model, T, step)."""
    try:
        ckpt = load_checkpoint(path, device)
        c = ckpt["config"]
        model = UNet(1, c["channels"], ints(c["channel_mult"]), ints(c["attn_res"]), 28, c["num_res_blocks"], c["dropout"])
        model.load_state_dict(ckpt["ema"])
        print(f"sampling from the EMA weights of {path} (step {ckpt['step']}, T = {c['timesteps']}); no training")
        return model.to(device).requires_grad_(False), int(c["timesteps"]), int(ckpt["step"])
    except Exception as e:  # unreadable file, missing keys, another model's weights: one message, not a traceback
        raise SystemExit(f"error: {path} is not a usable ddpm.py checkpoint (an unconditional U-Net with 'config' and 'ema'): "
                         f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")


def net(m, cfg, device):  # the network in bf16 autocast on CUDA when asked; everything around it stays float32
    def eps_model(xt, t):
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            return m(xt, t).float()
    return eps_model


def fit(cfg, ddim, out, device):
    """ddpm.py's training loop (Algorithm 1 with EMA), used when there is no checkpoint: returns (EMA model, figures)."""
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    model = UNet(1, cfg.channels, ints(cfg.channel_mult), ints(cfg.attn_res), 28, cfg.num_res_blocks, cfg.dropout).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    print(f"no checkpoint at {cfg.ckpt!r}: training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M-parameter U-Net "
          f"(T = {cfg.timesteps}) with ddpm.py's loss into {out / 'ckpt.pt'}")

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    t0, running, last_loss = time.time(), [], float("nan")
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="ddim")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits x0
            x0 = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            # 2. Algorithm 1: noise them to random steps t and regress the noise (the loss DDIM shares with DDPM)
            loss = ddim.loss(net(model, cfg, device), x0)
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
    checkpoint()
    if not cfg.sample_only:
        print(f"trained {step} steps in {time.time() - t0:.0f} s")
    return ema, {"step": step, "train_time": time.time() - t0, "loss": last_loss, "ckpt": str(out / "ckpt.pt")}


def to_unit(x):  # [-1, 1] -> [0, 1], as ddpm.py writes its samples
    return ((x + 1) / 2).clamp(0, 1).cpu()


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    reuse = bool(cfg.ckpt) and Path(cfg.ckpt).is_file()  # then no training: DDIM reuses DDPM's network (README Eq. 4.5, 4.6)
    model, T, step = load_ddpm(cfg.ckpt, device) if reuse else (None, cfg.timesteps, 0)
    if cfg.sample_steps > T:
        raise SystemExit(f"error: --sample-steps {cfg.sample_steps} is more than the model's T = {T} steps")
    out.mkdir(parents=True, exist_ok=True)
    ddim = DDIM(T).to(device)
    model, results = (model, {"ckpt": cfg.ckpt, "step": step}) if reuse else fit(cfg, ddim, out, device)
    eps_model = net(model.eval(), cfg, device)

    # 1. samples: S network calls per image, from the same x_T for every S of the sweep (README Eq. 4.10)
    results["samples"] = {}
    for S in sorted({min(s, T) for s in ints(cfg.sweep_steps)}) if cfg.sweep else [cfg.sample_steps]:
        torch.manual_seed(cfg.seed)
        xT = torch.randn(cfg.num_samples, 1, 28, 28, device=device)  # (N, 1, 28, 28)
        t0 = time.time()
        x = torch.cat([ddim.sample(eps_model, xT[i:i + 250], S, cfg.eta, cfg.skip, cfg.clip) for i in range(0, len(xT), 250)])
        results["samples"][S] = seconds = time.time() - t0  # 250 at a time: larger batches ran slower on a CPU (ddpm.py)
        name = f"samples_{S}" if cfg.sweep else "samples"
        save_grid(to_unit(x[:64]), out / f"{name}.png", nrow=8)
        np.savez_compressed(out / f"{name}.npz", images=(to_unit(x) * 255).round().byte().numpy())
        print(f"S = {S}: {len(x)} samples in {seconds:.1f} s ({seconds / len(x):.4f} s each); wrote {out / name}.png and .npz")

    # 2. inversion: the first 8 test digits -> x_T -> back, eta = 0 both ways, S steps each (README Eq. 4.13)
    S = cfg.sample_steps
    x0 = load_mnist(cfg.data_dir, train=False)[0][:8].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (8, 1, 28, 28)
    xT = ddim.invert(eps_model, x0, S, cfg.skip)
    x0_rec = ddim.sample(eps_model, xT, S, 0.0, cfg.skip)
    results["inversion_rmse"] = rmse = ((x0_rec.clamp(-1, 1) - x0) * 127.5).pow(2).mean().sqrt().item()  # pixel values 0..255
    save_grid(torch.cat([to_unit(x0), ((xT.clamp(-3, 3) + 3) / 6).cpu(), to_unit(x0_rec)]), out / "inversion.png", nrow=8)
    print(f"inversion at S = {S}: RMSE {rmse:.2f} (of 0..255); x_T mean {xT.mean():.3f}, std {xT.std():.3f}; wrote {out / 'inversion.png'}")

    # 3. the latent space: slerp between two x_T, each decoded with eta = 0
    z = torch.randn(2, 1, 28, 28, device=device)
    path = torch.stack([slerp(z[0], z[1], a) for a in torch.linspace(0, 1, 10).tolist()])  # (10, 1, 28, 28)
    save_grid(to_unit(ddim.sample(eps_model, path, S, 0.0, cfg.skip, cfg.clip)), out / "interpolation.png", nrow=10)
    print(f"wrote {out / 'interpolation.png'} (slerp between two x_T, decoded with S = {S}, eta = 0)")
    return results


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
