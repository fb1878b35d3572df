"""
Glow: a normalizing flow of actnorm, invertible 1x1 convolutions and affine couplings, on MNIST.

Paper: Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018,
arXiv 1807.03039. Builds on RealNVP (Dinh, Sohl-Dickstein and Bengio, 2016, arXiv 1605.08803).

The idea: an invertible map x -> z made of L levels (squeeze, then K steps, then split half of the
channels off with a learned prior). Each step is actnorm (a per-channel affine map initialized from
the data), an invertible 1x1 convolution (a learned channel mixing that generalizes a permutation; in
LU form its log-det is a sum) and an affine coupling (half the channels scaled and shifted by a CNN of
the other half). The log-likelihood is exact (change of variables, 00_prerequisites README Eq. 1.5),
so training is plain maximum likelihood; sampling runs the map backwards from Gaussian noise, every std scaled by T.

    actnorm:   y = s * x + b,            logdet = H W sum log|s|                  (README Eq. 4.1)
    1x1 conv:  y_ij = W x_ij,            logdet = H W log|det W|                  (README Eq. 4.4)
    LU form:   W = P L (U + diag(s)),    logdet = H W sum log|s|                  (README Eq. 4.5)
    coupling:  y_b = (x_b + t(x_a)) * sigmoid(h(x_a) + 2),  logdet = sum log sigmoid(...)  (README Eq. 4.6)
    bits/dim = (-log p(y) + D log 256) / (D log 2),  y = (x + u) / 256            (README Eq. 4.10)

Run:   python 03_normalizing_flows/glow.py                     (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 03_normalizing_flows/glow.py --steps 3600 --depth 8 --hidden 64 --warmup 200
Measured on a 2-core CPU: 10 min 39 s (wall, whole command), test bits/dim 2.071 on the 10 000 test digits (the
module's target of 1.6 not reached at this budget); FID 348.0 at T = 0.7, 313.8 at T = 1.0 (metrics.py, N = 1000).
Writes out/glow/: ckpt.pt, samples.png, samples.npz (at --temperature), temperatures.png.
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
from PIL import Image
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA for the convolutions (log-dets and loss stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/glow"  # checkpoint, samples and grids go here
    steps: int = 50000  # optimizer steps
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # Adam learning rate (after the warm-up)
    warmup: int = 500  # steps of linear learning-rate warm-up from 0
    clip: float = 50.0  # gradient-norm clipping threshold
    levels: int = 2  # L: levels of the multi-scale flow (28 -> 14 -> 7 allows at most 2)
    depth: int = 32  # K: flow steps per level
    hidden: int = 512  # channels of the coupling CNN
    lu: bool = True  # 1x1 convolution in LU form (log-det a sum); --no-lu: plain W with slogdet and inverse
    init_batch: int = 512  # training images for the data-dependent actnorm initialization
    temperature: float = 0.7  # T for samples.png / samples.npz: every Gaussian's std is scaled by T
    num_samples: int = 1000  # images in samples.npz
    eval_images: int = 1000  # test digits for the periodic bits/dim (the final figure uses all)
    log_every: int = 1000  # steps between test evaluations, checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if not 1 <= self.levels or 28 % 2 ** self.levels:
            raise ValueError(f"--levels must be 1 or 2 (each level halves 28 x 28 by a squeeze), got {self.levels}")
        if self.depth < 1 or self.hidden < 1 or self.temperature < 0 or self.init_batch < 2 or self.warmup < 0 \
                or not self.clip > 0 or self.eval_images < 1:
            raise ValueError("--depth, --hidden, --eval-images must be >= 1, --temperature, --warmup >= 0, "
                             "--init-batch >= 2, --clip > 0")


# --- Model ---


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


class ActNorm(nn.Module):
    """y = s * x + b per channel (Eq. 4.1), s = exp(3 v): the official code's logscale_factor 3 lets Adam
    (steps of about lr in v) move log s three times faster. The first batch it sees sets b and s so that
    its output has zero mean and unit variance per channel (Eq. 4.2); after that they are trained."""

    def __init__(self, c):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(1, c, 1, 1))  # log s / 3
        self.b = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))  # in the checkpoint, so --resume skips the init

    @torch.no_grad()
    def initialize(self, x):  # x: (B, C, H, W)
        mean = x.mean((0, 2, 3), keepdim=True)
        std = x.std((0, 2, 3), keepdim=True, unbiased=False)
        self.v.copy_(-torch.log(std + 1e-6) / 3)
        self.b.copy_(-mean / (std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x):
        if not self.initialized:
            self.initialize(x)
        logs = 3 * self.v
        logdet = x.shape[2] * x.shape[3] * logs.sum()  # H W sum log|s| (Eq. 4.1)
        return x * logs.exp() + self.b, logdet.expand(x.shape[0])

    def inverse(self, y):
        return (y - self.b) * torch.exp(-3 * self.v)


class InvConv1x1(nn.Module):
    """y_ij = W x_ij at every pixel (Eq. 4.3), W initialized to a random rotation. Plain form: W is the
    parameter, logdet = H W log|det W| (Eq. 4.4, an O(C^3) determinant). LU form (Eq. 4.5): W = P L (U + diag(s))
    with P a fixed permutation, L unit lower, U strictly upper, s = sign * exp(logs): logdet = H W sum logs."""

    def __init__(self, c, lu=True):
        super().__init__()
        self.lu = lu
        w0 = torch.linalg.qr(torch.randn(c, c))[0]  # a random rotation (orthogonal: log|det| = 0)
        if not lu:
            self.weight = nn.Parameter(w0)
            return
        p, l, u = torch.linalg.lu(w0)  # w0 = P L U
        s = torch.diagonal(u)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c), -1))
        self.lower = nn.Parameter(torch.tril(l, -1))  # entries below the diagonal of L (its diagonal is 1)
        self.upper = nn.Parameter(torch.triu(u, 1))  # entries above the diagonal of U
        self.logs = nn.Parameter(torch.log(s.abs()))  # log|s|, s the diagonal of U

    def weight_matrix(self):  # (C, C)
        if not self.lu:
            return self.weight
        eye = torch.eye(len(self.logs), dtype=self.logs.dtype, device=self.logs.device)
        l = self.lower * self.lower_mask + eye
        u = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.logs.exp())
        return self.p @ l @ u

    def log_abs_det(self):  # log|det W|
        return self.logs.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    def forward(self, x):  # (B, C, H, W)
        w = self.weight_matrix()
        logdet = x.shape[2] * x.shape[3] * self.log_abs_det()  # Eq. 4.4 / 4.5
        return F.conv2d(x, w[:, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, y):
        w_inv = torch.linalg.inv(self.weight_matrix()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


class ZeroConv2d(nn.Module):
    """3x3 conv, weights and bias zero at init, output times exp(3 logs) (official conv2d_zeros; Eq. 4.7)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(3 * self.logs)


class AffineCoupling(nn.Module):
    """x = (x_a, x_b) by channels; y_a = x_a, y_b = (x_b + t) * sigmoid(h + 2) with (t, h) = NN(x_a)
    (Eq. 4.6). The NN is conv3x3 -> actnorm -> ReLU -> conv1x1 -> actnorm -> ReLU -> ZeroConv2d."""

    def __init__(self, c, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(c // 2, hidden, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.norm2 = ActNorm(hidden)
        self.out = ZeroConv2d(hidden, 2 * (c - c // 2))

    def shift_scale(self, x_a):
        h = F.relu(self.norm1(self.conv1(x_a))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        h = self.out(h)
        t, h = h.to(torch.promote_types(h.dtype, torch.float32)).chunk(2, 1)  # float32 under bf16 autocast
        return t, F.logsigmoid(h + 2)  # log of the scale sigmoid(h + 2) in (0, 1): 0.88 at init

    def forward(self, x):
        x_a, x_b = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
        t, log_scale = self.shift_scale(x_a)
        y_b = (x_b + t) * log_scale.exp()
        return torch.cat([x_a, y_b.to(x.dtype)], 1), log_scale.flatten(1).sum(1)

    def inverse(self, y):
        y_a, y_b = y[:, :y.shape[1] // 2], y[:, y.shape[1] // 2:]
        t, log_scale = self.shift_scale(y_a)
        return torch.cat([y_a, (y_b * torch.exp(-log_scale) - t).to(y.dtype)], 1)


class FlowStep(nn.Module):
    """One step of Glow (Figure 2a of the paper): actnorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, c, hidden, lu=True):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(c), InvConv1x1(c, lu), AffineCoupling(c, hidden)])

    def forward(self, x):
        logdet = 0
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class Split(nn.Module):
    """Factor out x_b with a learned prior N(mu(x_a), sigma(x_a)^2) (Eq. 4.8), as the layer y = (x_a, eps),
    eps = (x_b - mu) / sigma, logdet = -sum log sigma: the prior is this layer plus N(eps; 0, I) (Eq. 4.9)."""

    def __init__(self, c):
        super().__init__()
        self.prior = ZeroConv2d(c // 2, 2 * (c - c // 2))  # predicts (mu, log sigma); zero at init: N(0, I)

    def forward(self, x):
        x_a, x_b = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
        mu, log_sigma = self.prior(x_a).chunk(2, 1)
        eps = (x_b - mu) * torch.exp(-log_sigma)
        return torch.cat([x_a, eps], 1), -log_sigma.flatten(1).sum(1)

    def inverse(self, y):
        y_a, eps = y[:, :y.shape[1] // 2], y[:, y.shape[1] // 2:]
        mu, log_sigma = self.prior(y_a).chunk(2, 1)
        return torch.cat([y_a, mu + torch.exp(log_sigma) * eps], 1)


class TopPrior(nn.Module):
    """Learned top prior N(mu, sigma^2) per channel (official learntop): eps = (x - mu) / sigma (Eq. 4.9)."""

    def __init__(self, c):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_sigma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        logdet = -x.shape[2] * x.shape[3] * self.log_sigma.sum()
        return (x - self.mu) * torch.exp(-self.log_sigma), logdet.expand(x.shape[0])

    def inverse(self, eps):
        return self.mu + torch.exp(self.log_sigma) * eps


# --- The method ---


class Glow(nn.Module):
    """Multi-scale Glow (Figure 2b of the paper): per level squeeze, K flow steps, split (all but the last
    level); the top prior last. forward maps x = y - 1/2 in [-1/2, 1/2)^D to eps (B, D), standard normal
    under the model, with logdet = log|det d eps / dx| (squeeze and channel slicing are permutations)."""

    def __init__(self, levels=2, depth=32, hidden=512, lu=True, in_shape=(1, 28, 28)):
        super().__init__()
        c, h, w = in_shape
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.shapes = []  # shape of each factored-out eps: (C, H, W)
        for i in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.levels.append(nn.ModuleList([FlowStep(c, hidden, lu) for _ in range(depth)]))
            if i < levels - 1:
                self.splits.append(Split(c))
                self.shapes.append((c - c // 2, h, w))
                c = c // 2
        self.top = TopPrior(c)
        self.shapes.append((c, h, w))

    def forward(self, x):  # x: (B, C, H, W) -> eps (B, D), logdet (B,)
        logdet, eps = 0, []
        for i, steps in enumerate(self.levels):
            x = squeeze(x)
            for step in steps:
                x, ld = step(x)
                logdet = logdet + ld
            if i < len(self.splits):
                x, ld = self.splits[i](x)
                logdet = logdet + ld
                x, e = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
                eps.append(e.flatten(1))
        x, ld = self.top(x)
        eps.append(x.flatten(1))
        return torch.cat(eps, 1), logdet + ld

    def inverse(self, eps):  # eps: (B, D) -> x (B, C, H, W)
        sizes = [math.prod(s) for s in self.shapes]
        parts = [e.view(-1, *s) for e, s in zip(eps.split(sizes, 1), self.shapes)]
        x = self.top.inverse(parts[-1])
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                x = self.splits[i].inverse(torch.cat([x, parts[i]], 1))
            for step in reversed(self.levels[i]):
                x = step.inverse(x)
            x = unsqueeze(x)
        return x

    def log_prob(self, x):
        """log p(x) = log N(eps; 0, I) + logdet (00_prerequisites README Eq. 1.5, README Eq. 4.9), per image."""
        eps, logdet = self(x)
        return -0.5 * (eps ** 2 + math.log(2 * math.pi)).sum(1) + logdet

    @torch.no_grad()
    def sample(self, n, temperature=1.0):
        """x = f^{-1}(T eps), eps ~ N(0, I): every prior's std (top and split) is scaled by T (Eq. 4.11)."""
        d = sum(math.prod(s) for s in self.shapes)
        return self.inverse(temperature * torch.randn(n, d, device=self.top.mu.device))


def dequantize(x, generator=None):  # uint8 (B, ...) -> y = (x + u) / 256 in (0, 1), u ~ U[0, 1) (Eq. 3.13)
    u = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return (x.float() + u.to(x.device)) / 256


def bits_per_dim(log_prob_y, dim):
    """Eq. 3.15: -log P(x) <= -log p(y) + D log 256 nats (Eq. 3.14) for the 8-bit image x, per dimension, in bits."""
    return (-log_prob_y + dim * math.log(256)) / (dim * math.log(2))


def to_pixels(x):
    """Flow output x = y - 1/2 -> uint8 pixels floor(256 y), the inverse of the dequantization."""
    return torch.nan_to_num(torch.floor((x + 0.5) * 256), nan=0.0).clamp(0, 255).to(torch.uint8)


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=500):
    """Test bits/dim (Eq. 4.10), one dequantization draw per digit, averaged over x_test (uint8 images)."""
    d = x_test[0].numel()
    total = 0.0
    for i in range(0, len(x_test), batch_size):
        x = x_test[i:i + batch_size]
        total += bits_per_dim(model.log_prob(dequantize(x) - 0.5), d).sum().item()
    return total / len(x_test)


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).unsqueeze(1)  # (N, 1, 28, 28) uint8
    x_test = load_mnist(cfg.data_dir, train=False)[0].to(device).unsqueeze(1)
    d = x_train[0].numel()

    model = Glow(cfg.levels, cfg.depth, cfg.hidden, cfg.lu).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise SystemExit(f"error: {out / 'ckpt.pt'} holds a Glow of another size; pass the flags it was trained with")
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    else:
        with torch.no_grad():  # data-dependent actnorm initialization (Eq. 4.2), layer by layer in one pass
            model(dequantize(x_train[torch.randperm(len(x_train), device=device)[:cfg.init_batch]]) - 0.5)

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="glow")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of digits, dequantized and centred: x = (pixels + u) / 256 - 1/2
            x = dequantize(x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]) - 0.5
            # 2. exact negative log-likelihood in bits/dim (Eq. 4.10), float32 log-dets
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = bits_per_dim(model.log_prob(x), d).mean()
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one Adam step with warm-up and gradient clipping
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / (cfg.warmup + 1))
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(bpd=f"{loss.item():.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                bpd = evaluate(model, x_test[:cfg.eval_images])
                model.train()
                bar.write(f"step {step}: test bits/dim {bpd:.3f} (first {min(cfg.eval_images, len(x_test))} test digits), "
                          f"{time.time() - t0:.0f} s")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    train_time = time.time() - t0

    bpd = evaluate(model.eval(), x_test)
    print(f"test bits/dim {bpd:.3f} on {len(x_test)} test digits after {step} steps, {train_time:.0f} s of training")
    if not cfg.sample_only:
        checkpoint()

    # temperatures.png: one row per T, the same eps in every column scaled by T (Eq. 4.11)
    temperatures = [0.0, 0.5, 0.7, 0.8, 1.0]
    eps = torch.randn(10, sum(math.prod(s) for s in model.shapes), device=device)
    with torch.no_grad():
        rows = [to_pixels(model.inverse(t * eps)) for t in temperatures]
    save_grid(torch.cat(rows).float() / 255, out / "temperatures.png", nrow=10)
    samples = torch.cat([to_pixels(model.sample(min(500, cfg.num_samples - i), cfg.temperature))
                         for i in range(0, cfg.num_samples, 500)])  # (N, 1, 28, 28) uint8
    save_grid(samples[:64].float() / 255, out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=samples.cpu().numpy())
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} (T = {cfg.temperature}) and {out / 'temperatures.png'} "
          f"(rows T = {', '.join(map(str, temperatures))})")
    return {"test_bpd": bpd, "step": step, "train_time": train_time}


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
    cfg = parse_config(Config, argv)
    return train(cfg)


if __name__ == "__main__":
    main()
