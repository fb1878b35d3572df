"""
RealNVP: exact log-likelihood through affine coupling layers, on 2-D toys and MNIST.

Papers: Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP", 2017, arXiv 1605.08803;
Dinh, Krueger and Bengio, "NICE: Non-linear Independent Components Estimation", 2014, arXiv 1410.8516
(additive coupling and diagonal scaling: --coupling additive); Theis, van den Oord and Bethge, "A note
on the evaluation of generative models", 2016, arXiv 1511.01844 (dequantization).

The idea: a mask b splits x into x_b, which passes through unchanged, and the rest, scaled and shifted by
amounts computed from x_b: invertible whatever the networks s and t are, with a triangular Jacobian, so
log|det J| is a sum of scales. Alternating masks, normalization layers and half of the dimensions factored
out at each scale give an exact density, trained by maximum likelihood; MNIST pixels are dequantized and
logit-transformed, so test bits/dim compare with published numbers.

    y_b = x_b,   y_{1-b} = x_{1-b} * exp(s(x_b)) + t(x_b)                   (README Eq. 3.1)
    x_{1-b} = (y_{1-b} - t(y_b)) * exp(-s(y_b)),   log|det J| = sum s(x_b)    (README Eq. 3.2, 3.4)
    log p(x) = log N(f(x); 0, I) + sum_k log|det J_k|                       (README Eq. 3.5)
    bits/dim = (-log p(y) + D log 256) / (D log 2),  y = (x + u) / 256      (README Eq. 3.15)

Run:   python 03_normalizing_flows/realnvp.py                   (MNIST; defaults sized for one GPU)
       python 03_normalizing_flows/realnvp.py --dataset moons --steps 3000 --batch-size 256 --out-dir out/realnvp/moons
CPU recipe: python 03_normalizing_flows/realnvp.py --steps 2400 --channels 32 --blocks 1
Measured on a 2-core CPU: 12 min 42 s (wall, whole command), test 1.468 bits/dim on all 10 000 MNIST test
digits; its 1000 samples: FID 139.7 (N = 1000), IS 6.22, precision 0.43, recall 0.79 (02_gans/metrics.py).
Writes out/realnvp/: ckpt.pt, samples.png, samples.npz (2-D data also density.png and layers.svg).
"""

import argparse
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
from PIL import Image, ImageDraw
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA for the s, t networks (log-determinants stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/realnvp"  # checkpoint, samples and figures go here
    steps: int = 100000  # optimizer steps
    batch_size: int = 64  # images (or 2-D points) per step (paper: 64)
    lr: float = 1e-3  # Adam learning rate (paper: 1e-3)
    weight_decay: float = 5e-5  # L2 penalty on the weights (paper: 5e-5)
    clip_grad: float = 100.0  # clip the gradient norm to this (0: no clipping)
    dataset: str = "mnist"  # mnist | moons | 8gaussians | checkerboard | swissroll | rings
    coupling: str = "affine"  # affine (RealNVP, Eq. 3.1) | additive (NICE, Eq. 3.6, adds its diagonal scaling)
    norm: str = "batch"  # flow layer after each coupling: batch (Eq. 3.11) | act (actnorm) | none
    channels: int = 64  # feature maps of the ResNets that compute s and t (MNIST)
    blocks: int = 4  # residual blocks per ResNet (MNIST)
    hidden: int = 256  # width of the MLPs that compute s and t (2-D data)
    layers: int = 8  # coupling layers, masks alternating (2-D data)
    alpha: float = 0.05  # logit transform of pixels: logit(alpha + (1 - 2 alpha) y) (paper: 0.05, Eq. 3.16)
    eval_size: int = 10000  # test images for the final bits/dim (MNIST), held-out points (2-D)
    num_samples: int = 1000  # samples saved to samples.npz
    log_every: int = 1000  # steps between evaluations (on 1000 test images), checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        choices = {"dataset": ("mnist", "moons", "8gaussians", "checkerboard", "swissroll", "rings"),
                   "coupling": ("affine", "additive"), "norm": ("batch", "act", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"--alpha must be in (0, 0.5), got {self.alpha}")
        if min(self.channels, self.hidden, self.layers, self.eval_size) < 1 or min(self.blocks, self.weight_decay, self.clip_grad) < 0:
            raise ValueError("--channels, --hidden, --layers, --eval-size must be at least 1; --blocks, "
                             "--weight-decay, --clip-grad not negative")


# --- Model: flow layers, each with forward(x) -> (y, logdet (B,)) and inverse(y) ---


def squeeze(x):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): every 2 x 2 patch of pixels becomes 4 channels (README section 3)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x):
    """The inverse of squeeze: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w)  # (B, C, 2, 2, H, W)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def logit_transform(y, alpha):
    """Pixels y in (0, 1) -> l = logit(alpha + (1 - 2 alpha) y), and log |det dl/dy| per image (README
    section 3). alpha keeps l finite near 0 and 1."""
    p = alpha + (1 - 2 * alpha) * y
    l = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)  # (B,)
    return l, logdet


def checkerboard_mask(size, parity):  # (1, 1, size, size): b = 1 where (i + j) % 2 == parity
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2 == parity).float().view(1, 1, size, size)


def channel_mask(channels, parity):  # (1, C, 1, 1): b = 1 on the first half of the channels (parity 0)
    b = (torch.arange(channels) < channels // 2).float()
    return (b if parity == 0 else 1 - b).view(1, channels, 1, 1)


class Coupling(nn.Module):
    """Affine (Eq. 3.1) or additive (Eq. 3.6) coupling. Mask b = 1 marks x_b, which passes through and
    feeds the network; b = 0 marks x_{1-b}, which is scaled by exp(s) and shifted by t."""

    def __init__(self, mask, net, channels, affine=True):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net, self.affine = net, affine  # net: x_b -> (raw s, t), each shaped like x
        # s = scale * tanh(raw s): bounded, so exp(s) cannot blow up early in training (paper's code)
        self.scale = nn.Parameter(torch.ones(1, channels, *[1] * (mask.dim() - 2)))

    def s_t(self, x_b):
        s, t = self.net(x_b)
        s, t = s.to(x_b.dtype), t.to(x_b.dtype)  # the log-det stays float32 under autocast
        s = self.scale * torch.tanh(s) if self.affine else torch.zeros_like(s)
        return s * (1 - self.mask), t * (1 - self.mask)  # zero on x_b, so y_b = x_b

    def forward(self, x):
        s, t = self.s_t(x * self.mask)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)  # Eq. 3.1 and its log-det, Eq. 3.4

    def inverse(self, y):
        s, t = self.s_t(y * self.mask)  # y_b = x_b, so s and t come out exactly as in forward
        return (y - t) * torch.exp(-s)  # Eq. 3.2


def _channel_view(v, x):  # (C,) -> broadcastable over (B, C) or (B, C, H, W)
    return v.view(1, -1, *[1] * (x.dim() - 2))


class BatchNormFlow(nn.Module):
    """Batch norm as an invertible layer, y = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta (Eq. 3.11):
    batch statistics in training (running averages updated); eval mode and inverse() use the running averages."""

    def __init__(self, channels, momentum=0.05, eps=1e-4):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma, self.beta = nn.Parameter(torch.zeros(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        mean, var = self.running_mean, self.running_var
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        y = (x - _channel_view(mean, x)) * _channel_view(torch.rsqrt(var + self.eps) * self.log_gamma.exp(), x)
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum() * x[0, 0].numel()  # Eq. 3.12
        return y + _channel_view(self.beta, x), logdet.expand(x.shape[0])

    def inverse(self, y):
        std = torch.sqrt(self.running_var + self.eps) * torch.exp(-self.log_gamma)
        return (y - _channel_view(self.beta, y)) * _channel_view(std, y) + _channel_view(self.running_mean, y)


class ActNorm(nn.Module):
    """Per-channel y = (x + bias) * exp(log_scale) (Kingma and Dhariwal 2018), initialized on the first
    training batch so that y starts with zero mean and unit variance per channel."""

    def __init__(self, channels):
        super().__init__()
        self.bias, self.log_scale = nn.Parameter(torch.zeros(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(0))

    def forward(self, x):
        if self.training and not self.initialized:
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                self.bias.copy_(-x.mean(dims))
                self.log_scale.copy_(-torch.log(x.std(dims) + 1e-6))
                self.initialized.fill_(1)
        y = (x + _channel_view(self.bias, x)) * _channel_view(self.log_scale.exp(), x)
        return y, (self.log_scale.sum() * x[0, 0].numel()).expand(x.shape[0])

    def inverse(self, y):
        return y * _channel_view(torch.exp(-self.log_scale), y) - _channel_view(self.bias, y)


class Squeeze(nn.Module):
    """squeeze as a flow layer (Eq. 3.8): a permutation of the dimensions, so log|det J| = 0."""

    def forward(self, x):
        return squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y):
        return unsqueeze(y)


class Scaling(nn.Module):
    """NICE's diagonal scaling layer: z = h * exp(S), log|det J| = sum S (Eq. 3.7)."""

    def __init__(self, dim):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y):
        return y * torch.exp(-self.log_scale)


class FlowSequence(nn.ModuleList):
    """Layers applied in order; their log-dets add up (Eq. 3.5)."""

    def forward(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in self:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


def norm_layer(norm, channels):  # --norm none is an empty FlowSequence: the identity
    return {"batch": BatchNormFlow, "act": ActNorm}[norm](channels) if norm != "none" else FlowSequence()


class MLP(nn.Module):
    """s, t for 2-D data: (B, D) -> two (B, D). The last layer starts at zero: each coupling starts as the identity."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x):
        return self.body(x).chunk(2, 1)


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h):
        return h + self.conv2(F.relu(self.conv1(F.relu(h))))


class ResNet(nn.Module):
    """s, t for images: (B, C, H, W) -> two (B, C, H, W); the output conv starts at zero."""

    def __init__(self, c_in, channels, blocks):
        super().__init__()
        self.inp = nn.Conv2d(c_in, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.out = nn.Conv2d(channels, 2 * c_in, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(F.relu(self.blocks(self.inp(x)))).chunk(2, 1)


def coupling_flow_2d(dim=2, layers=8, hidden=256, coupling="affine", norm="batch"):
    """2-D flow: couplings with masks (1, 0), (0, 1), (1, 0), ..., each followed by a norm layer."""
    steps = []
    for k in range(layers):
        mask = torch.tensor([[1.0, 0.0] if k % 2 == 0 else [0.0, 1.0]])  # (1, 2)
        steps += [Coupling(mask, MLP(dim, hidden), dim, coupling == "affine"), norm_layer(norm, dim)]
    return FlowSequence(steps)


class MultiScaleFlow(nn.Module):
    """The paper's multi-scale architecture (README Eq. 3.8-3.10). Each of `scales` scales: 3 checkerboard couplings,
    squeeze, 3 channel couplings, then half of the channels are factored out (part of z from there on). Last scale:
    4 checkerboard couplings. MNIST: 1 x 28 x 28 -> 4 x 14 x 14 (2 channels out) -> 8 x 7 x 7 (4 out) -> 4 x 7 x 7."""

    def __init__(self, in_channels=1, size=28, channels=64, blocks=4, coupling="affine", norm="batch", scales=2):
        super().__init__()

        def couplings(masks, c):
            return [layer for mask in masks for layer in
                    (Coupling(mask, ResNet(c, channels, blocks), c, coupling == "affine"), norm_layer(norm, c))]

        self.stages, self.shapes = nn.ModuleList(), []  # shapes: (C, H, W) of each part of z
        c, s = in_channels, size
        for _ in range(scales):
            self.stages.append(FlowSequence(couplings([checkerboard_mask(s, k % 2) for k in range(3)], c) + [Squeeze()]
                                            + couplings([channel_mask(4 * c, k % 2) for k in range(3)], 4 * c)))
            c, s = 2 * c, s // 2
            self.shapes.append((c, s, s))  # half of the 4c channels leave here (Eq. 3.9)
        self.final = FlowSequence(couplings([checkerboard_mask(s, k % 2) for k in range(4)], c))
        self.shapes.append((c, s, s))

    def forward(self, x):  # (B, C, H, W) -> z (B, D), logdet (B,)
        zs, logdet = [], x.new_zeros(x.shape[0])
        for stage in self.stages:
            x, ld = stage(x)
            c = x.shape[1] // 2
            zs.append(x[:, :c].flatten(1))  # factor out (Eq. 3.9): identity from here on (Eq. 3.10)
            x, logdet = x[:, c:], logdet + ld
        x, ld = self.final(x)
        return torch.cat(zs + [x.flatten(1)], 1), logdet + ld

    def inverse(self, z):  # (B, D) -> (B, C, H, W)
        parts = list(z.split([math.prod(shape) for shape in self.shapes], 1))
        x = self.final.inverse(parts.pop().view(-1, *self.shapes[-1]))
        for stage, shape in zip(reversed(self.stages), reversed(self.shapes[:-1])):
            x = stage.inverse(torch.cat([parts.pop().view(-1, *shape), x], 1))
        return x


# --- The method ---


class RealNVP(nn.Module):
    """A flow f with a standard normal base: log p(x) = log N(f(x); 0, I) + log|det df/dx| (Eq. 3.5).
    With alpha set (images), x is the dequantized pixel y in (0, 1)^D and the first layer is the logit
    transform (Eq. 3.16, 3.17), so log_prob is the density of y, the one bits/dim needs (Eq. 3.15).
    scaling=True appends NICE's diagonal scaling (Eq. 3.7)."""

    def __init__(self, flow, shape, alpha=None, scaling=False):
        super().__init__()
        self.flow, self.shape, self.alpha = flow, tuple(shape), alpha
        self.dim = math.prod(self.shape)
        self.scaling = Scaling(self.dim) if scaling else FlowSequence()  # without NICE: the identity

    def forward(self, x):  # x (B, *shape) -> z (B, D), logdet (B,)
        logdet = x.new_zeros(x.shape[0])
        if self.alpha is not None:
            x, logdet = logit_transform(x, self.alpha)
        z, ld = self.flow(x)
        z, ld_scaling = self.scaling(z.flatten(1))
        return z, logdet + ld + ld_scaling

    def inverse(self, z):  # z (B, D) -> x (B, *shape)
        z = self.scaling.inverse(z)
        x = self.flow.inverse(z if isinstance(self.flow, MultiScaleFlow) else z.view(-1, *self.shape))
        if self.alpha is not None:
            x = (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha)  # undo Eq. 3.16
        return x

    def log_prob(self, x):  # (B,) in nats
        z, logdet = self(x)
        return -0.5 * (z.pow(2).sum(1) + self.dim * math.log(2 * math.pi)) + logdet

    @torch.no_grad()
    def sample(self, n):
        return self.inverse(torch.randn(n, self.dim, device=next(self.parameters()).device))


def build_model(cfg):
    if cfg.dataset == "mnist":
        flow = MultiScaleFlow(1, 28, cfg.channels, cfg.blocks, cfg.coupling, cfg.norm)
        return RealNVP(flow, (1, 28, 28), cfg.alpha, scaling=cfg.coupling == "additive")
    return RealNVP(coupling_flow_2d(2, cfg.layers, cfg.hidden, cfg.coupling, cfg.norm), (2,), None, cfg.coupling == "additive")


def dequantize(x, generator=None):  # uint8 (B, ...) -> y = (x + u) / 256 in (0, 1), u ~ U[0, 1) (Eq. 3.13)
    u = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return (x.float() + u.to(x.device)) / 256


def bits_per_dim(log_prob_y, dim):
    """Eq. 3.15: -log P(x) <= -log p(y) + D log 256 nats (Eq. 3.14) for the 8-bit image x, per dimension, in bits."""
    return (-log_prob_y + dim * math.log(256)) / (dim * math.log(2))


@torch.no_grad()
def evaluate(model, x, batch_size=500, seed=0):
    """uint8 images: mean bits/dim with fixed dequantization noise. 2-D points: mean NLL in nats."""
    generator, total = torch.Generator().manual_seed(seed), 0.0
    for xb in x.split(batch_size):
        if xb.dtype == torch.uint8:
            total += bits_per_dim(model.log_prob(dequantize(xb, generator)), model.dim).sum().item()
        else:
            total -= model.log_prob(xb).sum().item()
    return total / len(x)


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device, out, mnist = pick_device(cfg.device), Path(cfg.out_dir), cfg.dataset == "mnist"
    out.mkdir(parents=True, exist_ok=True)
    if mnist:
        x_train = load_mnist(cfg.data_dir, train=True)[0].unsqueeze(1).to(device)  # (N, 1, 28, 28) uint8
        x_test = load_mnist(cfg.data_dir, train=False)[0][:cfg.eval_size].unsqueeze(1).to(device)
    else:
        data_gen = torch.Generator().manual_seed(cfg.seed)
        x_test = toy_2d(cfg.dataset, cfg.eval_size, torch.Generator().manual_seed(cfg.seed + 1)).to(device)

    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    unit = "bits/dim" if mnist else "nats"
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="realnvp")
    model.train()
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a batch: dequantized training digits y = (x + u) / 256 (Eq. 3.13), or fresh 2-D points
            x = (dequantize(x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]) if mnist
                 else toy_2d(cfg.dataset, cfg.batch_size, data_gen).to(device))
            # 2. exact negative log-likelihood through the flow (Eq. 3.5)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = -model.log_prob(x).float().mean()
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step, the gradient norm clipped
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{bits_per_dim(-loss, model.dim).item() if mnist else loss.item():.3f} {unit}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                bar.write(f"step {step}: test {evaluate(model, x_test[:1000]):.3f} {unit} (1000 held out), {time.time() - t0:.0f} s")
                if mnist:
                    save_grid(model.sample(64).clamp(0, 1), out / "samples.png", nrow=8)
                model.train()
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    if not cfg.sample_only:
        checkpoint()

    model.eval()
    if mnist:
        result = {"step": step, "test_bpd": evaluate(model, x_test)}
        print(f"test {result['test_bpd']:.4f} bits/dim on {len(x_test)} MNIST test digits after {step} steps, {time.time() - t0:.0f} s")
        y = torch.cat([model.sample(500).clamp(0, 1) for _ in range(0, cfg.num_samples, 500)])[:cfg.num_samples]
        save_grid(y[:64], out / "samples.png", nrow=8)
        images = (y * 256).floor().clamp(0, 255).byte()  # the 8-bit value whose bin holds y
        np.savez_compressed(out / "samples.npz", images=images.cpu().numpy())
        print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}")
        return result
    result = {"step": step, "test_nll": evaluate(model, x_test)}
    line = f"held-out NLL {result['test_nll']:.4f} nats on {len(x_test)} points"
    if cfg.dataset in ("8gaussians", "checkerboard"):  # the true density's NLL: an estimate of its entropy
        result["true_nll"] = -toy_2d_log_prob(cfg.dataset, x_test.cpu()).mean().item()
        line += f" (true density: {result['true_nll']:.4f})"
    print(line + f" after {step} steps, {time.time() - t0:.0f} s")
    samples = model.sample(cfg.num_samples).cpu()
    np.savez_compressed(out / "samples.npz", points=samples.numpy().astype(np.float32))
    draw_density(model, toy_2d(cfg.dataset, 20000, torch.Generator().manual_seed(cfg.seed + 2)), samples, out)
    base = torch.randn(500, 2, generator=torch.Generator().manual_seed(cfg.seed + 3)).to(device)
    save_layers_svg(push_through_layers(model, base), out / "layers.svg")
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'}, {out / 'density.png'} and {out / 'layers.svg'}")
    return result


# --- Figures (2-D data) ---


@torch.no_grad()
def draw_density(model, data, samples, out, size=256, extent=4.0):
    """density.png: data, the learned density exp(log p) on a grid, samples; samples.png: the samples."""
    def scatter(points):
        canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        ij = ((points.cpu() + extent) / (2 * extent) * size).floor().long()
        ij = ij[((ij >= 0) & (ij < size)).all(1)]
        canvas[size - 1 - ij[:, 1].numpy(), ij[:, 0].numpy()] = (40, 60, 140)  # y axis pointing up
        return canvas

    centres = (torch.arange(size) + 0.5) / size * 2 * extent - extent
    xx, yy = torch.meshgrid(centres, centres.flip(0), indexing="xy")  # row 0 at the top: largest y
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(next(model.parameters()).device)
    density = model.log_prob(grid).exp().view(size, size).cpu()
    t = (density / density.max()).sqrt().numpy()[..., None]  # sqrt so the low-density tails show
    heat = ((1 - t) * np.array([20, 20, 60.0]) + t * np.array([255, 230, 80.0])).round().astype(np.uint8)
    figure = Image.new("RGB", (3 * size + 32, size + 26), "white")
    draw = ImageDraw.Draw(figure)
    for i, (title, panel) in enumerate([("data", scatter(data)), ("learned density", heat), ("samples from the flow", scatter(samples))]):
        figure.paste(Image.fromarray(panel), (8 + i * (size + 8), 18))
        draw.text((8 + i * (size + 8), 3), title, fill="black")
    figure.save(out / "density.png")
    Image.fromarray(scatter(samples)).save(out / "samples.png")


@torch.no_grad()
def push_through_layers(model, z):
    """Base samples z pushed through the inverse flow, recorded after each coupling (for layers.svg)."""
    stages = [z]
    z = model.scaling.inverse(z)
    for layer in reversed(model.flow):
        z = layer.inverse(z)
        if isinstance(layer, Coupling):
            stages.append(z)
    return stages


def save_layers_svg(stages, path, panel=170, extent=4.0, columns=5):
    """One scatter panel per stage, as SVG text. Points keep the colour of their base sample's quadrant,
    so regions can be followed through the layers. A dot is a zero-length round-capped line (~12 bytes)."""
    quadrant = (stages[0][:, 0] > 0).long() + 2 * (stages[0][:, 1] > 0).long()
    width, height = columns * (panel + 10) + 10, math.ceil(len(stages) / columns) * (panel + 34) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'font-family="Helvetica, Arial, sans-serif" font-size="13">', '<rect width="100%" height="100%" fill="white"/>']
    for k, points in enumerate(stages):
        x0, y0 = 10 + (k % columns) * (panel + 10), 28 + (k // columns) * (panel + 34)
        title = "z ~ N(0, I)" if k == 0 else "x: after all layers" if k == len(stages) - 1 else f"after {k} coupling{'s' * (k > 1)}"
        parts.append(f'<text x="{x0 + panel / 2}" y="{y0 - 8}" text-anchor="middle" fill="#1E293B">{title}</text>')
        parts.append(f'<rect x="{x0}" y="{y0}" width="{panel}" height="{panel}" fill="#F8FAFC" stroke="#CBD5E1"/>')
        u = x0 + (points[:, 0].cpu() + extent) / (2 * extent) * panel
        v = y0 + (extent - points[:, 1].cpu()) / (2 * extent) * panel
        inside = (u > x0) & (u < x0 + panel) & (v > y0) & (v < y0 + panel)
        for q, colour in enumerate(["#2563EB", "#DC2626", "#059669", "#D97706"]):
            keep = inside & (quadrant.cpu() == q)
            d = "".join(f"M{a:.1f} {b:.1f}h0" for a, b in zip(u[keep].tolist(), v[keep].tolist()))
            parts.append(f'<path d="{d}" stroke="{colour}" stroke-width="2.6" stroke-linecap="round"/>')
    Path(path).write_text("\n".join(parts + ["</svg>"]) + "\n")


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
