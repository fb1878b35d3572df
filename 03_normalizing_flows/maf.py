"""
Masked autoregressive flow (MAF): a stack of MADEs, each an autoregressive Gaussian read as an invertible map.

Papers: Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density Estimation", 2017,
arXiv:1705.07057; Germain, Gregor, Murray and Larochelle, "MADE: Masked Autoencoder for Distribution
Estimation", 2015, arXiv:1502.03509; the inverse construction is Kingma et al., "Improving Variational
Inference with Inverse Autoregressive Flow", 2016, arXiv:1606.04934.

The idea: an autoregressive Gaussian p(x) = prod_i N(x_i; mu_i(x_<i), exp(alpha_i(x_<i))^2) generates x
from noise u ~ N(0, I) one coordinate at a time. Read backwards, x -> u is an invertible map whose
Jacobian is triangular, so log p(x) is exact and costs one network pass. MADE computes every mu_i and
alpha_i in that one pass by masking the weights of an ordinary MLP so that output i only sees inputs
before i in a chosen order. MAF stacks several MADEs, each with its order reversed (or shuffled),
optionally with batch norm between them. Density: one pass. Sampling: D passes, one per coordinate.

    u_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i))                        (README Eq. 5.3)
    log p(x) = sum_i log N(u_i; 0, 1) - sum_i alpha_i(x_<i)              (README Eq. 5.5)
    MADE masks: M^W[k, j] = [m(k) >= m(j)],  M^V[i, k] = [m(i) > m(k)]    (README Eq. 5.7)
    sampling: x_i = mu_i(x_<i) + u_i exp(alpha_i(x_<i)), i = 1..D in order (README section 5.1)
MNIST: x in {0..255}^784, y = (x + U[0,1)) / 256, the flow models l = logit(lam + (1 - 2 lam) y) with
lam = 1e-6 as in the MAF paper's code; bits/dim = (-log p(y) + D log 256) / (D log 2) (README section 3).

Run:   python 03_normalizing_flows/maf.py     (MNIST at the paper's sizes: sized for one GPU, not measured on a GPU)
       python 03_normalizing_flows/maf.py --dataset 8gaussians --steps 6000 --hidden 128 --num-mades 8 --lr 1e-3 --batch-size 256
       (that one: 80 s on a 2-core CPU, held-out NLL 3.003 nats; the true density's: 2.840 nats)
CPU recipe: python 03_normalizing_flows/maf.py --steps 4000 --hidden 512 --lr 1e-3
Measured on a 2-core CPU: 5 min 59 s (wall, whole command: 4000 steps in 277 s, 1000 samples in 78 s), test
1.891 bits/dim on the 10 000 test digits; FID 197.5 at N = 1000 (IS 5.97, precision 0.655, recall 0.739).
Writes out/maf/: ckpt.pt, samples.png, samples.npz (MNIST: images; 2-D data: points and density.png).
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

DATASETS = ("mnist", "moons", "8gaussians", "checkerboard", "swissroll", "rings")


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy; also the random orders of --order random)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA for the MADE networks (log-determinants and loss stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/maf"  # checkpoint, samples and figures go here
    dataset: str = "mnist"  # mnist | moons | 8gaussians | checkerboard | swissroll | rings (2-D data from toy_2d)
    steps: int = 100000  # optimizer steps
    batch_size: int = 100  # examples per step (MAF paper: 100)
    lr: float = 1e-4  # Adam learning rate (MAF paper: 1e-4)
    weight_decay: float = 1e-6  # L2 penalty on the weights (MAF paper: 1e-6)
    num_mades: int = 5  # MADEs in the stack (MAF paper, MNIST: 5 or 10)
    hidden: int = 1024  # units per hidden layer of each MADE (MAF paper, MNIST: 1024)
    hidden_layers: int = 2  # hidden layers per MADE (MAF paper's MNIST runs: 2)
    order: str = "reverse"  # order of each MADE after the first: reverse (the previous one's, flipped) | random
    batch_norm: bool = True  # batch norm after every MADE, a flow layer with its own log-det (README Eq. 5.9)
    lam: float = 1e-6  # MNIST logit transform: l = logit(lam + (1 - 2 lam) y) (MAF paper: 1e-6)
    num_samples: int = 1000  # samples for samples.npz (MNIST: D = 784 sequential passes per MADE)
    log_every: int = 1000  # steps between test evaluations, checkpoints and sample figures
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.order not in ("reverse", "random"):
            raise ValueError(f"--order must be reverse or random, got {self.order!r}")
        for name in ("num_mades", "hidden", "hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lam < 0.5:
            raise ValueError(f"--lam must lie in (0, 0.5), got {self.lam}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be non-negative, got {self.weight_decay}")


# --- Model ---


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out, in): y = b + (W * M) x."""

    def __init__(self, d_in, d_out, mask):
        super().__init__(d_in, d_out)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


def made_masks(order, hidden, hidden_layers):
    """MADE's masks (README Eq. 5.7) for inputs taken in `order` (order[k] = the variable that comes k-th).
    Degrees: input j gets m(j) = its position in the order, 1..D; hidden unit k gets (k mod (D - 1)) + 1,
    sequential as in the MAF code; outputs get their input's degree. A hidden unit may see inputs of
    degree <= its own; an output only hidden units of strictly smaller degree: so output i depends on
    input j only if m(j) <= ... < m(i), the autoregressive property."""
    d = len(order)
    m_in = torch.empty(d, dtype=torch.long)
    m_in[order] = torch.arange(1, d + 1)
    m_hidden = torch.arange(hidden) % max(d - 1, 1) + 1
    masks, m_prev = [], m_in
    for _ in range(hidden_layers):
        masks.append(m_hidden[:, None] >= m_prev[None, :])  # (hidden, previous)
        m_prev = m_hidden
    masks.append(m_in[:, None] > m_prev[None, :])  # (D, hidden): strict, so output i never sees x_i
    return masks, m_in


class MADE(nn.Module):
    """One affine autoregressive layer x -> u (README Eq. 5.3) whose mu and alpha come from one masked
    MLP pass. forward(x) -> (u, logdet) with logdet = log |det du/dx| = -sum_i alpha_i (Eq. 5.4);
    inverse(u) -> x takes D passes (README section 5.3)."""

    def __init__(self, dim, hidden, hidden_layers, order):
        super().__init__()
        masks, degrees = made_masks(order, hidden, hidden_layers)
        self.register_buffer("degrees", degrees)
        sizes = [dim] + [hidden] * hidden_layers
        layers = []
        for d_in, d_out, mask in zip(sizes[:-1], sizes[1:], masks[:-1]):
            layers += [MaskedLinear(d_in, d_out, mask), nn.ReLU()]
        layers.append(MaskedLinear(hidden, 2 * dim, masks[-1].repeat(2, 1)))  # rows: mu_1..mu_D, alpha_1..alpha_D
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)  # start at the identity map: mu = 0, alpha = 0
        nn.init.zeros_(self.net[-1].bias)

    def mu_alpha(self, x):  # (B, D) -> (B, D), (B, D), in x's dtype even under autocast
        mu, alpha = self.net(x).to(x.dtype).chunk(2, dim=1)
        return mu, alpha

    def forward(self, x):  # (B, D) -> (B, D), (B,)
        mu, alpha = self.mu_alpha(x)
        u = (x - mu) * torch.exp(-alpha)  # Eq. 5.3
        return u, -alpha.sum(1)  # Eq. 5.4: triangular Jacobian, diagonal exp(-alpha_i)

    def inverse(self, u):  # (B, D) -> (B, D), D sequential passes (section 5.3)
        x = torch.zeros_like(u)
        for _ in range(u.shape[1]):
            # after pass k every x_i of degree <= k is exact: it only used x_j of degree < k
            mu, alpha = self.mu_alpha(x)
            x = mu + u * torch.exp(alpha)
        return x


class BatchNorm(nn.Module):
    """Batch norm as a flow layer (README Eq. 5.9): u = exp(log_gamma) (x - m) / sqrt(v + eps) + beta,
    with the batch's mean and variance in training and running averages in eval mode; logdet =
    sum(log_gamma - log(v + eps) / 2), the same for every example. inverse uses the running averages,
    so inverse(forward(x)) = x holds in eval mode."""

    def __init__(self, dim, momentum=0.05, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):  # (B, D) -> (B, D), (B,)
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        u = (x - mean) * torch.rsqrt(var + self.eps) * torch.exp(self.log_gamma) + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return u, logdet.expand(x.shape[0])

    def inverse(self, u):  # (B, D) -> (B, D)
        return (u - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(self.running_var + self.eps) + self.running_mean


# --- The method ---


class MAF(nn.Module):
    """A stack of MADEs (each with its own order: the first natural, then reversed or shuffled), with
    optional batch norm after each. forward(x) -> (u, logdet) goes data -> noise in one pass per
    layer; inverse(u) and sample(n) go noise -> data, D passes per MADE."""

    def __init__(self, dim, hidden=1024, hidden_layers=2, num_mades=5, order="reverse", batch_norm=True, seed=0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"MAF needs at least 2 dimensions, got {dim}")
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        layers, current = [], torch.arange(dim)
        for k in range(num_mades):
            if k > 0:  # a new order (section 5.4), so every variable gets to condition on every other
                current = current.flip(0) if order == "reverse" else torch.randperm(dim, generator=generator)
            layers.append(MADE(dim, hidden, hidden_layers, current))
            if batch_norm:
                layers.append(BatchNorm(dim))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):  # (B, D) -> u (B, D), log |det du/dx| (B,)  (Eq. 5.8)
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, u):  # (B, D) -> (B, D)
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u

    def log_prob(self, x):  # (B, D) -> (B,) in nats: Eq. 5.5 summed over the stack (Eq. 5.8)
        u, logdet = self(x)
        return -0.5 * (u ** 2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def loss(self, x):
        """Maximum likelihood: the mean negative log-likelihood in nats, in float32 (Eq. 5.5)."""
        return -self.log_prob(x).float().mean()

    @torch.no_grad()
    def sample(self, n):  # -> (n, D): u ~ N(0, I) pushed through inverse (section 5.3, per MADE)
        return self.inverse(torch.randn(n, self.dim, device=self.layers[0].degrees.device))


# --- Training ---


def logit_transform(y, alpha):
    """Pixels y in (0, 1) -> l = logit(alpha + (1 - 2 alpha) y), and log |det dl/dy| per image (README
    section 3). alpha keeps l finite near 0 and 1."""
    p = alpha + (1 - 2 * alpha) * y
    l = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)  # (B,)
    return l, logdet


def dequantize(x, generator=None):  # uint8 (B, ...) -> y = (x + u) / 256 in (0, 1), u ~ U[0, 1) (Eq. 3.13)
    u = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return (x.float() + u.to(x.device)) / 256


def to_pixels(l, lam):
    """Undo logit_transform(dequantize(x)): l (B, 784) -> uint8 (B, 1, 28, 28); y = (x + u) / 256, so x = floor(256 y)."""
    y = (torch.sigmoid(l) - lam) / (1 - 2 * lam)
    return (y * 256).floor().clamp(0, 255).to(torch.uint8).view(-1, 1, 28, 28)


def bits_per_dim(log_prob_y, dim):
    """Eq. 3.15: -log P(x) <= -log p(y) + D log 256 nats (Eq. 3.14) for the 8-bit image x, per dimension, in bits."""
    return (-log_prob_y + dim * math.log(256)) / (dim * math.log(2))


@torch.no_grad()
def mnist_bits_per_dim(model, x, lam, seed=0, batch_size=1000):
    """Test bits/dim on uint8 digits x (N, 784), with fixed dequantization noise; log p(y) = log p(l) +
    log |det dl/dy| adds the logit transform's correction (README Eq. 3.15, 3.17)."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise, and bits/dim, on every device
    total = 0.0
    for i in range(0, len(x), batch_size):
        l, logdet = logit_transform(dequantize(x[i:i + batch_size], generator), lam)
        total += bits_per_dim(model.log_prob(l) + logdet, x.shape[1]).sum().item()
    return total / len(x)


@torch.no_grad()
def mean_nll(model, x, batch_size=10000):  # held-out negative log-likelihood in nats, 2-D data
    return -sum(model.log_prob(x[i:i + batch_size]).sum().item() for i in range(0, len(x), batch_size)) / len(x)


@torch.no_grad()
def draw_density(model, data, samples, path, size=256, extent=4.0):
    """Three panels drawn with pillow over [-extent, extent]^2: training data, the learned density
    exp(log p) on a size x size grid, and samples from the flow."""
    def scatter(points):
        canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        ij = ((points.cpu() + extent) / (2 * extent) * size).floor().long()
        ij = ij[((ij >= 0) & (ij < size)).all(1)]
        canvas[size - 1 - ij[:, 1].numpy(), ij[:, 0].numpy()] = (40, 60, 140)
        return canvas

    centres = (torch.arange(size) + 0.5) / size * 2 * extent - extent
    xx, yy = torch.meshgrid(centres, centres.flip(0), indexing="xy")  # row 0 at the top: largest y
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(data.device)
    density = model.log_prob(grid).exp().nan_to_num(0.0).view(size, size).cpu()  # nan: overflow far from the data
    t = (density / density.max()).sqrt().numpy()[..., None]  # sqrt so the low-density tails show
    heat = ((1 - t) * np.array([20, 20, 60.0]) + t * np.array([255, 230, 80.0])).round().astype(np.uint8)
    gap, label = 8, 18
    figure = Image.new("RGB", (3 * size + 4 * gap, size + gap + label), "white")
    draw = ImageDraw.Draw(figure)
    for i, (title, panel) in enumerate([("training data", scatter(data)), ("learned density", heat),
                                        ("samples from the flow", scatter(samples))]):
        figure.paste(Image.fromarray(panel), (gap + i * (size + gap), label))
        draw.text((gap + i * (size + gap), 3), title, fill="black")
    figure.save(path)


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mnist = cfg.dataset == "mnist"
    if mnist:
        x_train = load_mnist(cfg.data_dir, train=True)[0].flatten(1).to(device)  # (60000, 784) uint8
        x_test = load_mnist(cfg.data_dir, train=False)[0].flatten(1).to(device)  # (10000, 784) uint8
    else:
        x_train = toy_2d(cfg.dataset, 100000, torch.Generator().manual_seed(cfg.seed)).to(device)  # (N, 2)
        x_test = toy_2d(cfg.dataset, 10000, torch.Generator().manual_seed(cfg.seed + 1)).to(device)  # held out

    model = MAF(x_train.shape[1], cfg.hidden, cfg.hidden_layers, cfg.num_mades, cfg.order, cfg.batch_norm,
                cfg.seed).to(device)
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

    def evaluate():  # MNIST: test bits/dim; 2-D: held-out NLL in nats
        model.eval()
        result = mnist_bits_per_dim(model, x_test, cfg.lam, cfg.seed) if mnist else mean_nll(model, x_test)
        model.train()
        return result

    def figures(n):  # samples (timed: D sequential passes per MADE) and the figure of the run
        model.eval()
        t = time.time()
        x = model.sample(n)
        seconds = time.time() - t
        if mnist:
            images = to_pixels(x, cfg.lam)
            save_grid(images[:64].float() / 255, out / "samples.png", nrow=8)
            np.savez_compressed(out / "samples.npz", images=images.cpu().numpy())
        else:
            draw_density(model, x_train[:20000], x, out / "density.png")
            np.savez_compressed(out / "samples.npz", points=x.float().cpu().numpy())
        model.train()
        return seconds

    unit = "bits/dim" if mnist else "nats"
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="maf")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch; MNIST digits get fresh dequantization noise and the logit transform
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            logdet_logit = 0.0
            if mnist:
                x, logdet_logit = logit_transform(dequantize(x), cfg.lam)
            # 2. exact negative log-likelihood through the stack (Eq. 5.5, 5.8), float32
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                nll = -(model.log_prob(x) + logdet_logit).float().mean()
            if not torch.isfinite(nll):
                raise SystemExit(f"error: loss is {nll.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step on every MADE (and batch-norm scale and shift)
            optimizer.zero_grad(set_to_none=True)
            nll.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            shown = (nll.item() + 784 * math.log(256)) / (784 * math.log(2)) if mnist else nll.item()
            bar.set_postfix(loss=f"{shown:.3f} {unit}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"step {step}: test {evaluate():.4f} {unit}")
                checkpoint()
                if not mnist:
                    figures(2000)
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    train_seconds = time.time() - t0

    result = {"step": step}
    result["test_bpd" if mnist else "test_nll"] = evaluate()
    print(f"after {step} steps ({train_seconds:.0f} s): test {result['test_bpd' if mnist else 'test_nll']:.4f} "
          f"{unit} on {len(x_test)} {'test digits' if mnist else 'held-out points'}")
    if cfg.dataset in ("8gaussians", "checkerboard"):
        result["true_nll"] = -toy_2d_log_prob(cfg.dataset, x_test.cpu()).mean().item()
        print(f"the true density's NLL on the same points: {result['true_nll']:.4f} nats")
    checkpoint()
    result["sample_seconds"] = figures(cfg.num_samples)
    print(f"sampled {cfg.num_samples} in {result['sample_seconds']:.1f} s ({cfg.num_mades} MADEs x "
          f"{x_train.shape[1]} passes); wrote {out / ('samples.png' if mnist else 'density.png')}, {out / 'samples.npz'}")
    return result


# --- Plumbing (shared helpers, identical in every script; see tests/test_plumbing.py) ---


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
    cfg = parse_config(Config, argv)
    return train(cfg)


if __name__ == "__main__":
    main()
