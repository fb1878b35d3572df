"""
Langevin dynamics and annealed Langevin dynamics with a noise-conditional score network (NCSN).

Papers: Song and Ermon, "Generative Modeling by Estimating Gradients of the Data Distribution", 2019,
arXiv 1907.05600 (NCSN); Song and Ermon, "Improved Techniques for Training Score-Based Generative
Models", 2020, arXiv 2006.09011 (NCSNv2: s_theta = net / sigma); Jolicoeur-Martineau et al.,
"Adversarial score matching and improved sampling for image generation", 2020, arXiv 2009.05475
(the final denoising step). Langevin: Roberts and Tweedie 1996; Welling and Teh 2011.

The idea: knowing only the score grad log p(x), Langevin dynamics walks x uphill in log p plus noise
and its stationary law is p (README Eq. 2.2). Part one (--demo, exact scores, no training): between
two far-apart modes of weights 0.2 / 0.8 the walk almost never crosses, so the chains keep the split
they started with; annealing through the exact score of p smoothed by ever smaller Gaussian noise
recovers the weights. Part two: one network s_theta(x, sigma) learns the score of every smoothed
density on a geometric ladder sigma_1 > ... > sigma_L by denoising score matching, each level
weighted by sigma^2, and annealed Langevin samples with it from coarse to fine.

    x <- x + (alpha/2) score(x) + sqrt(alpha) z,  z ~ N(0, I)                    (README Eq. 2.4)
    L = E_i E_x E_z  1/2 || sigma_i s_theta(x + sigma_i z, sigma_i) + z ||^2      (README Eq. 2.9)
    alpha_i = eps sigma_i^2 / sigma_L^2,  T steps at each level i = 1..L           (README Eq. 2.10)

Run:   python 04_score_based_models/langevin.py                (MNIST, defaults sized for one GPU)
       python 04_score_based_models/langevin.py --demo         (part one only, seconds)
       python 04_score_based_models/langevin.py --dataset 8gaussians --steps 3000  (2-D, 10 to 26 s on a 2-core CPU)
CPU recipe: python 04_score_based_models/langevin.py --steps 2000 --channels 16 --steps-per-level 10 --eps 5e-5
Measured on a 2-core CPU: 9 min 45 s by the script's clocks (447 s training, 138 s sampling 1000 digits); FID 396.4 at N = 1000, IS 5.43,
confident 0.536: blobs and strokes, not recognizable digits. Demo: share of the 0.8 mode 0.516 plain, 0.777 annealed.
Writes out/langevin/: demo.png, ckpt.pt, samples.png, samples.npz, and chain.png (MNIST) or trajectories.png (2-D).
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
from PIL import Image, ImageDraw
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA for the network (loss and Langevin arithmetic stay float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/langevin"  # checkpoint, samples and figures go here
    steps: int = 50000  # optimizer steps
    batch_size: int = 128  # images (or 2-D points) per step (paper: 128)
    lr: float = 1e-3  # Adam learning rate (paper: 1e-3)
    dataset: str = "mnist"  # mnist | moons | 8gaussians | swissroll | checkerboard | rings
    channels: int = 64  # U-Net width at 28 x 28 (doubled at 14 x 14 and 7 x 7) (MNIST)
    hidden: int = 128  # width of the score MLP (2-D data)
    sigma_max: float = 0.0  # sigma_1, the largest noise level; 0: 1.0 for MNIST (paper), 6.0 for 2-D (about the data's diameter)
    sigma_min: float = 0.01  # sigma_L, the smallest noise level (paper: 0.01)
    num_levels: int = 10  # L, noise levels on the geometric ladder (paper: 10)
    steps_per_level: int = 100  # T, Langevin steps at each level (paper: 100)
    eps: float = 2e-5  # step size at the last level; alpha_i = eps sigma_i^2 / sigma_L^2 (paper: 2e-5)
    denoise: bool = True  # end with x + sigma_L^2 s_theta(x, sigma_L) (Jolicoeur-Martineau et al. 2020)
    ema_decay: float = 0.999  # exponential moving average of the weights used for sampling (NCSNv2); 0: none
    num_samples: int = 1000  # samples saved to samples.npz
    log_every: int = 2000  # steps between checkpoints
    demo_chains: int = 10000  # chains of the unequal-weights demo run before training (0: skip it)
    demo: bool = False  # only part one: exact-score Langevin on a 0.2 / 0.8 mixture (demo.png), no training
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        datasets = ("mnist", "moons", "8gaussians", "swissroll", "checkerboard", "rings")
        if self.dataset not in datasets:
            raise ValueError(f"--dataset must be one of {', '.join(datasets)}, got {self.dataset!r}")
        if self.sigma_max == 0:
            self.sigma_max = 1.0 if self.dataset == "mnist" else 6.0
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < --sigma-min < --sigma-max, got {self.sigma_min} and {self.sigma_max}")
        if min(self.num_levels - 1, self.steps_per_level, self.channels, self.hidden) < 1 or self.demo_chains < 0 or not self.eps > 0:
            raise ValueError("--num-levels must be at least 2; --steps-per-level, --channels, --hidden at least 1; "
                             "--demo-chains not negative; --eps positive")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")


# --- Model ---


class SigmaEmbedding(nn.Module):
    """sigma (B,) -> (B, dim): sinusoids of log sigma at geometric frequencies, then a small MLP."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.25), math.log(16.0), dim // 2)))
        self.mlp = nn.Sequential(nn.Linear(2 * (dim // 2), dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma):
        angle = sigma.log()[:, None] * self.freqs  # (B, dim/2)
        return self.mlp(torch.cat([angle.sin(), angle.cos()], 1))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus a per-channel shift from the sigma embedding, twice; a skip."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(math.gcd(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.shift = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(math.gcd(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, emb_dim) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x))) + self.shift(emb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class UNet(nn.Module):
    """A small noise-conditional U-Net: 28 -> 14 -> 7 -> 14 -> 28 with skip connections."""

    def __init__(self, c=64):
        super().__init__()
        self.embed = SigmaEmbedding(4 * c)
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = ResBlock(c, c, 4 * c)
        self.pool1 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2 = ResBlock(c, 2 * c, 4 * c)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 2 * c, 4 * c)
        self.up2 = ResBlock(4 * c, 2 * c, 4 * c)
        self.up1 = ResBlock(3 * c, c, 4 * c)
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(8, c), c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, x, sigma):  # (B, 1, 28, 28), (B,) -> (B, 1, 28, 28)
        emb = self.embed(sigma)  # (B, 4c)
        h1 = self.down1(self.inp(x), emb)  # (B, c, 28, 28)
        h2 = self.down2(self.pool1(h1), emb)  # (B, 2c, 14, 14)
        h = self.mid(self.pool2(h2), emb)  # (B, 2c, 7, 7)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), h2], 1), emb)  # (B, 2c, 14, 14)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), h1], 1), emb)  # (B, c, 28, 28)
        return self.out(h)


class ScoreMLP(nn.Module):
    """(x, sigma) -> 2 numbers for 2-D data: the sigma embedding is added to the first layer."""

    def __init__(self, hidden=128):
        super().__init__()
        self.embed = SigmaEmbedding(hidden)
        self.inp = nn.Linear(2, hidden)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, sigma):  # (B, 2), (B,) -> (B, 2)
        return self.net(self.inp(x) + self.embed(sigma))


# --- The method ---


def sigma_ladder(sigma_max, sigma_min, num_levels):
    """sigma_1 = sigma_max > ... > sigma_L = sigma_min, a geometric sequence (README Eq. 2.7)."""
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_levels, dtype=torch.float64).float()


def mixture_score(x, weights, means, var):
    """Exact score of sum_k w_k N(mu_k, var I) at x (N, D) (README Eq. 2.6); for the mixture smoothed by
    N(0, sigma^2 I) pass var + sigma^2. The responsibilities r_k(x) are a softmax; Z never appears."""
    d2 = ((x[:, None, :] - means) ** 2).sum(-1)  # (N, K) squared distances to the centres
    r = torch.softmax(weights.log() - d2 / (2 * var), 1)  # (N, K) posterior of the component
    return (r[:, :, None] * (means - x[:, None, :])).sum(1) / var  # (N, D)


def langevin(score, x, eps, n_steps, generator=None):
    """Unadjusted Langevin dynamics (README Eq. 2.4): x <- x + (eps/2) score(x) + sqrt(eps) z.
    For N(mu, s^2) its stationary variance is s^2 / (1 - eps / (4 s^2)), not s^2 (README Eq. 2.5)."""
    for _ in range(n_steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + eps / 2 * score(x) + math.sqrt(eps) * z
    return x


def annealed_langevin(score, x, sigmas, eps, T, denoise=False, record=0, generator=None):
    """Annealed Langevin dynamics (NCSN, Algorithm 1): T steps of Eq. 2.4 with the score of p smoothed
    at sigma_i and step alpha_i = eps sigma_i^2 / sigma_L^2 (README Eq. 2.10), for i = 1..L. With denoise,
    a last step x + sigma_L^2 s(x, sigma_L) (Tweedie's formula, README Eq. 2.11) removes the noise sigma_L.
    score(x, sigma) takes a 0-d sigma. Returns x and, if record > 0, the path of the first `record`
    chains, (L T + 1, record, ...)."""
    path = [x[:record].clone()]
    for sigma in sigmas:
        alpha = (eps * sigma ** 2 / sigmas[-1] ** 2).item()
        for _ in range(T):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + alpha / 2 * score(x, sigma) + math.sqrt(alpha) * z
            if record:
                path.append(x[:record].clone())
    if denoise:
        x = x + sigmas[-1] ** 2 * score(x, sigmas[-1])
    return x, (torch.stack(path) if record else None)


def dsm_loss(score, z, sigma):
    """sigma^2-weighted denoising score matching (README Eq. 2.8): the target score of
    x~ = x + sigma z given x is -z / sigma, so 1/2 sigma^2 || s + z / sigma ||^2 = 1/2 || sigma s + z ||^2
    (Eq. 2.9), summed over dimensions, averaged over the batch. sigma broadcasts against z."""
    return (0.5 * sigma ** 2 * (score + z / sigma) ** 2).flatten(1).sum(1).mean()


class NCSN(nn.Module):
    """Noise-conditional score network: s_theta(x, sigma) = net(x / sqrt(1 + sigma^2), sigma) / sigma.
    Dividing by sigma (NCSNv2, Technique 3) makes the network output sigma s_theta, which is O(1) at
    every level; dividing the input by sqrt(1 + sigma^2) keeps it O(1) too (our choice)."""

    def __init__(self, net, sigma_max=1.0, sigma_min=0.01, num_levels=10):
        super().__init__()
        self.net = net
        self.register_buffer("sigmas", sigma_ladder(sigma_max, sigma_min, num_levels))

    def score(self, x, sigma):  # (B, ...), (B,) -> (B, ...)
        s = sigma.view(-1, *[1] * (x.dim() - 1))
        return self.net(x / (1 + s ** 2).sqrt(), sigma).float() / s

    def loss(self, x, level=None):
        """Eq. 2.9 with a level i drawn uniformly per example (or the given level for all)."""
        i = torch.randint(len(self.sigmas), (x.shape[0],), device=x.device) if level is None else \
            torch.full((x.shape[0],), level, device=x.device)
        sigma = self.sigmas[i]  # (B,)
        s = sigma.view(-1, *[1] * (x.dim() - 1))
        z = torch.randn_like(x)
        return dsm_loss(self.score(x + s * z, sigma), z, s)

    @torch.no_grad()
    def sample(self, x, eps, T, denoise=True, record=0):
        return annealed_langevin(lambda x, sigma: self.score(x, sigma.expand(len(x))), x, self.sigmas,
                                 eps, T, denoise, record)


# --- Part one: exact scores, a mixture of unequal weights ---


DEMO_WEIGHTS = (0.2, 0.8)  # p = 0.2 N((-5, -5), I) + 0.8 N((5, 5), I), the paper's example (Section 3.2.2, Figure 3)
DEMO_MEANS = ((-5.0, -5.0), (5.0, 5.0))


def unequal_weights_demo(n=10000, generator=None):
    """n chains from U[-8, 8]^2, 1000 steps each way: plain Langevin (Eq. 2.4, eps = 0.1) with the exact
    score, and annealed Langevin (Eq. 2.10, sigma 20 -> 1, L = 10, T = 100, eps = 0.1; sigma_1 about the
    largest distance between points, NCSNv2's rule) with the exact score of the smoothed mixture. Returns both end points and the share of
    each in the 0.8 mode (the half-plane x + y > 0)."""
    weights, means = torch.tensor(DEMO_WEIGHTS, dtype=torch.float64), torch.tensor(DEMO_MEANS, dtype=torch.float64)
    x0 = 16 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 8  # (n, 2)
    plain = langevin(lambda x: mixture_score(x, weights, means, 1.0), x0, 0.1, 1000, generator)
    sigmas = sigma_ladder(20.0, 1.0, 10).double()
    annealed, _ = annealed_langevin(lambda x, sigma: mixture_score(x, weights, means, 1 + sigma ** 2),
                                    x0, sigmas, 0.1, 100, generator=generator)
    return plain, annealed, (plain.sum(1) > 0).double().mean().item(), (annealed.sum(1) > 0).double().mean().item()


def run_demo(cfg):
    n = max(cfg.demo_chains, 1)
    plain, annealed, share_plain, share_annealed = unequal_weights_demo(n, torch.Generator().manual_seed(cfg.seed))
    print(f"unequal weights demo (true share of the (5, 5) mode 0.8): plain Langevin {share_plain:.3f}, "
          f"annealed Langevin {share_annealed:.3f} ({n} chains from U[-8, 8]^2)")
    save_panels([(f"plain Langevin: share {share_plain:.2f} (true 0.80)", scatter(plain, 10.0)),
                 (f"annealed, ends at sigma_L = 1: share {share_annealed:.2f}", scatter(annealed, 10.0))], Path(cfg.out_dir) / "demo.png")
    return {"demo_share_plain": share_plain, "demo_share_annealed": share_annealed}


# --- Training ---


def mode_shares(points):
    """8gaussians: the share of samples nearest each centre (8,), and the fraction within 3 std of one."""
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)  # (8, 2)
    dist, nearest = torch.cdist(points.double().cpu(), centres).min(1)
    return torch.bincount(nearest, minlength=8).double() / len(points), (dist < 3 * math.sqrt(2) / 4).double().mean().item()


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run_demo(cfg) if cfg.demo_chains else {}
    mnist = cfg.dataset == "mnist"
    if mnist:
        data = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(255).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
        net = UNet(cfg.channels)
    else:
        data = toy_2d(cfg.dataset, 100000, torch.Generator().manual_seed(cfg.seed)).to(device)  # (N, 2)
        net = ScoreMLP(cfg.hidden)
    model = NCSN(net, cfg.sigma_max, cfg.sigma_min, cfg.num_levels).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "ema": ema.state_dict(),
                                          "optimizer": optimizer.state_dict(), "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="langevin")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of data
            x = data[torch.randint(len(data), (cfg.batch_size,), device=device)]
            # 2. perturb each example at a random level of the ladder; sigma^2-weighted DSM (Eq. 2.9)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = model.loss(x)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step, then the moving average of the weights
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - cfg.ema_decay)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    train_time = time.time() - t0
    checkpoint()

    # the loss at each level on held-out data: sigma^2 weighting keeps every level O(1) (Eq. 2.9)
    x_eval = (load_mnist(cfg.data_dir, train=False)[0][:500].to(device).float().div(255).unsqueeze(1) if mnist
              else toy_2d(cfg.dataset, 5000, torch.Generator().manual_seed(cfg.seed + 1)).to(device))
    with torch.no_grad():
        per_level = [ema.loss(x_eval, level).item() for level in range(cfg.num_levels)]
    print(f"{step} steps, {train_time:.0f} s; held-out loss per level (sigma_1 .. sigma_L): "
          + " ".join(f"{v:.2f}" for v in per_level))

    # annealed Langevin from x0 ~ U[0, 1]^D (MNIST, as NCSN) or N(0, sigma_1^2 I) (2-D)
    t0 = time.time()
    x0 = (torch.rand(cfg.num_samples, 1, 28, 28, device=device) if mnist
          else cfg.sigma_max * torch.randn(cfg.num_samples, 2, device=device))
    x, path = ema.sample(x0, cfg.eps, cfg.steps_per_level, cfg.denoise, record=1 if mnist else 8)
    result.update(step=step, loss_per_level=per_level, sample_time=time.time() - t0)
    print(f"{cfg.num_samples} samples, {cfg.num_levels} x {cfg.steps_per_level} Langevin steps: {result['sample_time']:.0f} s")
    if mnist:
        images = x.clamp(0, 1)
        save_grid(images[:64], out / "samples.png", nrow=8)
        np.savez_compressed(out / "samples.npz", images=(images * 255).round().byte().cpu().numpy())
        frames = list(path[::cfg.steps_per_level, 0]) + [images[0]]  # x0, the end of each level, denoised
        save_grid(torch.stack(frames).clamp(0, 1), out / "chain.png", nrow=len(frames))
        print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} and {out / 'chain.png'}")
        return result
    np.savez_compressed(out / "samples.npz", points=x.float().cpu().numpy())
    save_panels([("samples", scatter(x, 4.5))], out / "samples.png")
    draw_trajectories(data[:3000], path, cfg.steps_per_level, out / "trajectories.png")
    if cfg.dataset == "8gaussians":
        shares, near = mode_shares(x)
        result.update(max_share_error=(shares - 1 / 8).abs().max().item(), near_fraction=near)
        print("8 modes' shares: " + " ".join(f"{v:.3f}" for v in shares) + f" (1/8 = 0.125); "
              f"within 3 std of a centre: {near:.3f}")
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} and {out / 'trajectories.png'}")
    return result


# --- Figures ---


def scatter(points, extent, size=256):
    """Points (N, 2) as dark dots on a white size x size canvas spanning [-extent, extent]^2, y up."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    ij = ((points.float().cpu() + extent) / (2 * extent) * size).floor().long()
    ij = ij[((ij >= 0) & (ij < size)).all(1)]
    canvas[size - 1 - ij[:, 1].numpy(), ij[:, 0].numpy()] = (40, 60, 140)
    return canvas


def save_panels(panels, path):
    """Titled panels side by side in one PNG."""
    size = panels[0][1].shape[0]
    figure = Image.new("RGB", (len(panels) * (size + 8) + 8, size + 26), "white")
    draw = ImageDraw.Draw(figure)
    for i, (title, panel) in enumerate(panels):
        figure.paste(Image.fromarray(panel), (8 + i * (size + 8), 18))
        draw.text((8 + i * (size + 8), 3), title, fill="black")
    figure.save(path)


def draw_trajectories(data, path, T, file, size=512, extent=4.5):
    """A few chains (path (L T + 1, K, 2)) over the data (grey): a line from the end of each level to the
    end of the next, coloured from orange (sigma_1) to dark blue (sigma_L), and the last three levels'
    steps in full; a black dot where each chain ends."""
    image = Image.fromarray(np.repeat(np.repeat(255 - (255 - scatter(data, extent, size // 2)) // 2, 2, 0), 2, 1))
    draw = ImageDraw.Draw(image)
    xy = (path.float().cpu() + extent) / (2 * extent) * size
    xy[..., 1] = size - xy[..., 1]
    levels = (len(path) - 1) // T
    for level in range(levels):
        t = level / max(levels - 1, 1)
        colour = tuple(int(a + t * (b - a)) for a, b in zip((240, 140, 30), (20, 40, 140)))
        steps = slice(level * T, (level + 1) * T + 1, 1 if level >= levels - 3 else T)
        for k in range(path.shape[1]):
            draw.line([tuple(p) for p in xy[steps, k].tolist()], fill=colour, width=2)
    for x, y in xy[-1].tolist():
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill="black")
    draw.text((6, 4), f"{path.shape[1]} chains of annealed Langevin, level by level: sigma_1 orange -> sigma_L blue", fill="black")
    image.save(file)


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
    if cfg.demo:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        return run_demo(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
