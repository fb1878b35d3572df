"""
Guidance: class-conditional diffusion on MNIST, steered by a noisy-image classifier or by itself.

Papers: Dhariwal and Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021, arXiv 2105.05233 (classifier
guidance); Ho and Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv 2207.12598. Built on ddpm.py
(Ho et al. 2020, arXiv 2006.11239) and sampled with DDIM's update (Song et al. 2021, arXiv 2010.02502, ddim.py).

The idea: Bayes' rule on scores, grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t). Classifier guidance adds
s times the gradient of a classifier p_phi(y | x_t, t), trained on noisy digits, to the unconditional prediction;
classifier-free guidance trains one U-Net with labels dropped to a null label 10, so it predicts both eps_theta(x_t, y)
and eps_theta(x_t, null), and their difference is an implicit classifier's gradient. Scales above 1 sharpen p(y | x_t):
more samples land in the requested class, and they vary less. Sampling: DDIM (eta = 0, x0_hat clipped to [-1, 1]).
    classifier guidance:  eps_hat = eps_theta(x_t, null) - s sqrt(1 - alpha_bar_t) grad_x_t log p_phi(y | x_t, t)   (README Eq. 5.4)
    classifier-free:      eps_tilde = (1 + w) eps_theta(x_t, y) - w eps_theta(x_t, null)                      (README Eq. 5.7)
    label dropout:        y -> null with probability p_uncond during training                                (README Eq. 5.8)

Run:   python 05_diffusion_models/guidance.py --sweep           (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 05_diffusion_models/guidance.py --steps 1800 --clf-steps 1500 --batch-size 64 --lr 1e-3 --channels 16 --attn-res= --num-res-blocks 1 --ema-decay 0.999 --clf-channels 16 --sample-steps 25 --log-every 300 --sweep
Measured on a 2-core CPU: 13 min 0 s (wall, whole command) = training 407 s (final L_simple 0.0271; classifier accuracy 0.94, 0.91,
0.51, 0.14 on noisy test digits at t = 100, 250, 500, 750) + 8 settings x 1000 samples x 25 steps, 28 to 66 s each. metrics.py at
N = 1000: classifier-free w = 1 FID 38.6, 98.3 % in the requested class; w = 0 (conditional) 46.1, 82.0 %; w = 3 103.7, 100 %;
unconditional (s = 0) 113.1, 9.1 %; classifier guidance s = 10 56.4, 78.4 %. S = 25 (not 50) keeps N = 1000 within the budget.
Writes out/guidance/: ckpt.pt (model, ema, classifier, optimizers), samples_<kind>_<scale>.npz/.png per setting (with
the requested labels; samples.npz/.png without --sweep), grid.png (one row per class 0-9 for --guidance at --scale).
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
    seed: int = 0  # random seed (torch, numpy); every sampling setting starts from the same x_T and asks for the same labels
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA (the networks only; schedule, losses, gradients and sampler stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/guidance"  # checkpoint, samples and grid go here
    steps: int = 7500  # optimizer steps of the conditional U-Net (ddpm.py's default)
    batch_size: int = 128  # images per step (for the U-Net and the classifier)
    lr: float = 2e-4  # Adam learning rate of the U-Net (Ho et al.: 2e-4 on CIFAR-10)
    channels: int = 64  # U-Net width at 28 x 28; level k has channels * mult[k]
    channel_mult: str = "1,2,2"  # comma-separated width multipliers, one per resolution 28, 14, 7
    attn_res: str = "14"  # comma-separated resolutions with self-attention in their blocks ("" for none); the middle block at the lowest resolution always has it
    num_res_blocks: int = 2  # residual blocks per resolution on the way down (one more on the way up)
    dropout: float = 0.0  # dropout inside the residual blocks (Ho et al.: 0.1 on CIFAR-10)
    timesteps: int = 1000  # T, the length of the training chain; betas are rescaled by 1000 / T (section 1, Eq. 1.6)
    ema_decay: float = 0.9995  # EMA of the U-Net's weights used for sampling, with warm-up min(decay, (1 + n) / (10 + n))
    grad_clip: float = 1.0  # clip the gradient norm of both networks (Ho et al.: 1.0)
    p_uncond: float = 0.2  # label dropout: probability that a training label is replaced by the null label (Ho and Salimans: 0.1 or 0.2)
    clf_steps: int = 5000  # optimizer steps of the noisy classifier, run alongside the U-Net's first steps
    clf_channels: int = 32  # classifier width at 28 x 28 (twice that at 14 and 7)
    clf_lr: float = 1e-3  # Adam learning rate of the classifier
    sample_steps: int = 50  # S, network evaluations per sample: the DDIM sub-sequence of the T steps
    eta: float = 0.0  # DDIM noise scale: 0 deterministic, 1 DDPM-like (README section 4)
    clip: bool = True  # clip x0_hat to [-1, 1] in each sampling step and re-derive eps from it (as ddpm.py)
    guidance: str = "cfg"  # cfg (classifier-free, scale w) | classifier (scale s): the setting sampled without --sweep, and the grid's
    scale: float = 3.0  # guidance scale of --guidance (w or s)
    sweep: bool = False  # sample every scale in --clf-scales and --cfg-scales, one samples file and one timing each
    clf_scales: str = "0,1,3,10"  # comma-separated classifier-guidance scales s for --sweep (s = 0: the unconditional model)
    cfg_scales: str = "0,1,3,7"  # comma-separated classifier-free scales w for --sweep (w = 0: the conditional model)
    num_samples: int = 1000  # samples per setting, the labels 0..9 in turn (S network calls each, 250 images per batch)
    log_every: int = 1000  # steps between loss reports and checkpoints
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):  # a bad value ends in one message: parse_config turns the ValueError into an error exit
        lists = re.fullmatch(r"[\d,]*", self.channel_mult + self.attn_res)  # integers only, or ints() would raise
        mult, numbers = ints(self.channel_mult) if lists else (), r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?)*\s*"
        checks = [  # (condition, what it needs)
            (self.timesteps >= 21, "--timesteps >= 21 (so the rescaled beta_T = 20 / T stays below 1)"),
            (1 <= self.sample_steps <= self.timesteps, "1 <= --sample-steps <= --timesteps"),
            (lists and 0 < len(mult) <= 3 and min(mult) >= 1, "1 to 3 positive integers in --channel-mult (28, 14, 7)"),
            (lists and set(ints(self.attn_res)) <= {28 >> k for k in range(len(mult))}, "--attn-res among those resolutions"),
            (min(self.channels, self.num_res_blocks, self.clf_channels) >= 1, "--channels, --num-res-blocks, --clf-channels >= 1"),
            (all(0 <= v < 1 for v in (self.ema_decay, self.dropout, self.p_uncond)), "0 <= --ema-decay, --dropout, --p-uncond < 1"),
            (self.grad_clip > 0 and self.clf_lr > 0, "--grad-clip > 0 and --clf-lr > 0"),
            (self.clf_steps >= 0 and self.eta >= 0, "--clf-steps >= 0 and --eta >= 0"),
            (self.guidance in ("cfg", "classifier") and math.isfinite(self.scale), "--guidance cfg or classifier, a finite --scale"),
            (all(re.fullmatch(numbers, s) for s in (self.clf_scales, self.cfg_scales)), "numbers >= 0 in --clf-scales, --cfg-scales")]
        if not all(ok for ok, _ in checks):
            raise ValueError("need " + next(need for ok, need in checks if not ok))  # the first rule broken


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


class NoisyClassifier(nn.Module):
    """p_phi(y | x_t, t), the U-Net's down half in small: ResBlocks with the time embedding at 28, 14 and 7 (attention
    at 7), GroupNorm-SiLU, the mean over the 7 x 7 positions (Dhariwal and Nichol pool with attention), a linear layer."""

    def __init__(self, channels=32, num_classes=10):
        super().__init__()
        self.channels, c, emb_dim = channels, channels, 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(c, c, emb_dim), nn.Conv2d(c, c, 3, stride=2, padding=1),  # 28 -> 14
                                     ResBlock(c, 2 * c, emb_dim), nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1),  # 14 -> 7
                                     ResBlock(2 * c, 2 * c, emb_dim, attention=True)])
        self.head = nn.Sequential(norm(2 * c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes))

    def forward(self, x, t):  # (B, 1, 28, 28), (B,) steps in 0..T -> (B, num_classes) logits
        emb, h = self.time_mlp(timestep_embedding(t, self.channels).to(x.dtype)), self.conv_in(x)  # (B, 4 * C), (B, C, 28, 28)
        for layer in self.blocks:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.head(h)


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


def drop_labels(y, p_uncond, num_classes):  # label dropout (README Eq. 5.8): y -> num_classes (null) with probability p_uncond
    return torch.where(torch.rand(y.shape, device=y.device) < p_uncond, torch.full_like(y, num_classes), y)


def cfg_eps(eps_cond, eps_uncond, w):  # classifier-free guidance (README Eq. 5.7); w = 0: conditional, w = -1: unconditional
    return (1 + w) * eps_cond - w * eps_uncond


def classifier_grad(classifier, xt, t, y):
    """grad_{x_t} log p_phi(y | x_t, t), (B, ...) like xt: one backward pass of the sum, as sample i's log p needs x_t[i] only."""
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(x, t).to(x.dtype), dim=-1).gather(1, y[:, None])  # (B, 1)
        return torch.autograd.grad(log_p.sum(), x)[0]


def sub_sequence(T, S):  # the S steps a sampler visits: T down to 1, evenly spaced, then 0 (where alpha_bar = 1)
    return torch.linspace(T, 1, S).round().long().tolist() + [0] if S > 1 else [T, 0]


class Guidance(nn.Module):
    """The schedule (a buffer) and what the guided models do with it. The networks are arguments, eps_model(x_t, t, y or
    None) and classifier(x_t, t) -> logits, so training, sampling and the tests' closed-form predictors share this code."""

    def __init__(self, timesteps=1000, num_classes=10):
        super().__init__()
        self.T, self.num_classes = timesteps, num_classes
        self.register_buffer("betas", linear_betas(timesteps).float())  # float32 as in ddpm.py (MPS has no float64)

    def loss(self, eps_model, x0, y, p_uncond):  # L_simple (Eq. 2.13), each label dropped to null with probability p_uncond
        t, eps = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device), torch.randn_like(x0)
        xt = q_sample(x0, t, eps, self.betas)
        return (eps - eps_model(xt, t, drop_labels(y, p_uncond, self.num_classes)).to(eps.dtype)).pow(2).mean()

    def classifier_loss(self, classifier, x0, y):  # cross-entropy, accuracy of p_phi(y | x_t, t) on x_t ~ q(x_t | x0) (Eq. 1.4)
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)
        logits = classifier(q_sample(x0, t, torch.randn_like(x0), self.betas), t).float()
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def eps(self, eps_model, classifier, xt, t, y, kind, scale):  # "cfg": w = scale (Eq. 5.7), "classifier": s = scale (Eq. 5.4)
        if kind == "cfg":
            eps_cond = eps_model(xt, t, y).to(xt.dtype)
            return eps_cond if scale == 0 else cfg_eps(eps_cond, eps_model(xt, t, None).to(xt.dtype), scale)
        eps_uncond, sigma = eps_model(xt, t, None).to(xt.dtype), (1 - per_sample(alpha_bar(self.betas)[t], xt)).sqrt()
        return eps_uncond if scale == 0 else eps_uncond - scale * sigma * classifier_grad(classifier, xt, t, y).to(xt.dtype)

    @torch.no_grad()
    def sample(self, eps_model, classifier, xT, y, kind, scale, S, eta=0.0, clip=True):
        """DDIM (README section 4) along S of the T steps with the guided eps, from xT (B, 1, 28, 28) for the labels y (B,)."""
        ab, steps, x = alpha_bar(self.betas), sub_sequence(self.T, S), xT
        for t, s in zip(steps[:-1], steps[1:]):
            eps = self.eps(eps_model, classifier, x, torch.full_like(y, t), y, kind, scale)
            if clip:  # x0_hat clipped to [-1, 1], then the eps it implies (as ddpm.py)
                x0_hat = ((x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()).clamp(-1, 1)
                eps = (x - ab[t].sqrt() * x0_hat) / (1 - ab[t]).sqrt()
            x = ddim_step(x, eps, ab[t], ab[s], eta, torch.randn_like(x))
        return x


def ema_update(ema, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device, out, (images, labels) = pick_device(cfg.device), Path(cfg.out_dir), load_mnist(cfg.data_dir, train=True)
    x_train, y_train = images.to(device).float().div(127.5).sub(1).unsqueeze(1), labels.to(device)  # (N, 1, 28, 28) in [-1, 1], (N,)
    model = UNet(1, cfg.channels, ints(cfg.channel_mult), ints(cfg.attn_res), 28, cfg.num_res_blocks, cfg.dropout, 10).to(device)
    ema, classifier = copy.deepcopy(model).requires_grad_(False), NoisyClassifier(cfg.clf_channels).to(device)
    nets, guidance = {"model": model, "ema": ema, "classifier": classifier}, Guidance(cfg.timesteps).to(device)
    optimizers = {"model": torch.optim.Adam(model.parameters(), lr=cfg.lr),
                  "classifier": torch.optim.Adam(classifier.parameters(), lr=cfg.clf_lr)}
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        for part, state in [(nets[n], ckpt[n]) for n in nets] + [(optimizers[n], ckpt["optimizer"][n]) for n in optimizers]:
            part.load_state_dict(state)
        step = ckpt["step"]
    print(f"U-Net: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; classifier: "
          f"{sum(p.numel() for p in classifier.parameters()) / 1e6:.2f} M; T = {cfg.timesteps}, p_uncond = {cfg.p_uncond}")

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {**{name: net.state_dict() for name, net in nets.items()},
                                          "optimizer": {name: opt.state_dict() for name, opt in optimizers.items()},
                                          "config": asdict(cfg), "step": step})

    def amp(net):  # the network in bf16 autocast on CUDA when asked; the losses, gradients and sampler stay float32
        return torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda")(lambda *a: net(*a).float())

    def update(name, loss):  # one gradient step (norm clipped) for nets[name] after a finiteness check; returns the loss
        if not torch.isfinite(loss):
            raise SystemExit(f"error: {name} loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(nets[name].parameters(), cfg.grad_clip)
        optimizers[name].step()
        return loss.item()
    t0, total, last = time.time(), max(cfg.steps, cfg.clf_steps), {}
    running = {name: [] for name in ("L_simple", "classifier cross-entropy", "accuracy on noisy x_t")}
    with tqdm(total=0 if cfg.sample_only else total, initial=step, desc="guidance") as bar:
        try:
            while step < total and not cfg.sample_only:
                idx = torch.randint(len(x_train), (cfg.batch_size,), device=device)  # 1. a random batch of digits x0, labels y
                x0, y = x_train[idx], y_train[idx]
                if step < cfg.steps:  # 2. the conditional U-Net: L_simple with label dropout (Eq. 5.8), then the EMA follows
                    running["L_simple"].append(update("model", guidance.loss(amp(model), x0, y, cfg.p_uncond)))
                    ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
                if step < cfg.clf_steps:  # 3. the classifier on the same digits noised afresh at random t (Dhariwal and Nichol)
                    clf_loss, acc = guidance.classifier_loss(amp(classifier), x0, y)
                    running["classifier cross-entropy"].append(update("classifier", clf_loss))
                    running["accuracy on noisy x_t"].append(acc.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running['L_simple'][-1] if running['L_simple'] else float('nan'):.4f}", refresh=False)
                if step % cfg.log_every == 0 or step == total:
                    last, running = {name: float(np.mean(v)) for name, v in running.items() if v}, {name: [] for name in running}
                    bar.write(f"step {step}: " + ", ".join(f"{name} {v:.4f}" for name, v in last.items()))
                    checkpoint()
        except KeyboardInterrupt:
            checkpoint()
            raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    results = {"step": step, "train_time": time.time() - t0, "loss": last.get("L_simple", float("nan")), "clf_accuracy": {}}
    if not cfg.sample_only:
        print(f"trained {step} steps in {results['train_time']:.0f} s")
        checkpoint()

    classifier.eval().requires_grad_(False)  # frozen: no graph below; classifier_grad differentiates with respect to x_t only
    images, labels = load_mnist(cfg.data_dir, train=False)  # noisy test digits: it guides only if it sees the class through noise
    x_test, y_test = images[:2000].to(device).float().div(127.5).sub(1).unsqueeze(1), labels[:2000].to(device)
    noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(0)).to(device)  # the same noise at each t
    for t in sorted({max(1, round(cfg.timesteps * f)) for f in (0.1, 0.25, 0.5, 0.75)}):
        xt = q_sample(x_test, torch.full_like(y_test, t), noise, guidance.betas)
        logits = torch.cat([amp(classifier)(x, torch.full_like(y, t)) for x, y in zip(xt.split(500), y_test.split(500))])
        results["clf_accuracy"][t] = (logits.argmax(1) == y_test).sum().item() / len(x_test)
    print(f"classifier accuracy on N = {len(x_test)} noisy test digits: "
          + ", ".join(f"t = {t}: {a:.3f}" for t, a in results["clf_accuracy"].items()))

    ema.eval()  # samples from the EMA weights: the same x_T and the same labels (0..9 in turn) for every setting
    sweep = [("classifier", float(s)) for s in cfg.clf_scales.split(",")] + [("cfg", float(w)) for w in cfg.cfg_scales.split(",")]
    settings = sweep if cfg.sweep else []
    settings += [] if (cfg.guidance, cfg.scale) in settings else [(cfg.guidance, cfg.scale)]  # and the grid's setting
    y_all, results["sample_time"] = torch.arange(cfg.num_samples, device=device) % 10, {}
    for kind, scale in settings:
        torch.manual_seed(cfg.seed)
        t0, name = time.time(), f"samples_{kind}_{scale:g}" if cfg.sweep else "samples"
        x = torch.cat([guidance.sample(amp(ema), amp(classifier), torch.randn(len(y), 1, 28, 28, device=device), y, kind, scale,
                                       cfg.sample_steps, cfg.eta, cfg.clip) for y in y_all.split(250)])  # 250 at a time, as ddpm.py
        samples = ((x + 1) / 2).clamp(0, 1).cpu()  # [-1, 1] -> [0, 1]
        results["sample_time"][f"{kind}_{scale:g}"] = seconds = time.time() - t0
        print(f"{kind} guidance, scale {scale:g}: {len(samples)} samples, S = {cfg.sample_steps}, eta = {cfg.eta:g}, "
              f"in {seconds:.1f} s; wrote {out / name}.npz")
        save_grid(samples[:64], out / f"{name}.png", nrow=8)
        np.savez_compressed(out / f"{name}.npz", images=(samples * 255).round().byte().numpy(), labels=y_all.cpu().numpy())
        if (kind, scale) == (cfg.guidance, cfg.scale):  # the grid: one row per class 0-9
            save_grid(torch.cat([samples[y_all.cpu() == c][:10] for c in range(10)]), out / "grid.png", nrow=10)
    print(f"wrote {out / 'grid.png'} (one row per class, {cfg.guidance} guidance at scale {cfg.scale:g})")
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
