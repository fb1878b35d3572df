"""
StyleGAN2: a style-based generator with weight demodulation, on MNIST padded to 32 x 32.

Papers: Karras, Laine and Aila, "A Style-Based Generator Architecture for Generative Adversarial
Networks", 2019, arXiv 1812.04948 (StyleGAN); Karras, Laine, Aittala, Hellsten, Lehtinen and Aila,
"Analyzing and Improving the Image Quality of StyleGAN", 2020, arXiv 1912.04958 (StyleGAN2);
Mescheder, Geiger and Nowozin, "Which Training Methods for GANs do actually Converge?", 2018,
arXiv 1801.04406 (the R1 penalty).

The idea: z never enters the convolutions. A mapping MLP turns the normalized z into w; per layer an
affine map A turns w into a style s that scales the conv's input channels (modulation), and the
weights are then rescaled so every output channel has unit variance again (demodulation). Synthesis
starts from a learned constant 4 x 4, adds per-pixel noise with learned per-channel scales B, and sums
the 1-channel toRGB outputs of 4, 8, 16 and 32 (skip generator). Training mixes two w's at a random
layer (style mixing); sampling can pull w toward its running mean (truncation). D is a residual conv
net with a minibatch-stddev feature; the loss is the non-saturating logistic one plus R1 on real data,
applied lazily. Equalized learning rate everywhere; bilinear upsampling (not the paper's FIR filter);
no path-length regularization, no progressive growing.

    w = f(z / rms(z)),   s = A(w)                                            (README Eq. 5.1)
    w'_ijk = s_i w_ijk,   w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps)        (README Eq. 5.2, 5.4)
    w_trunc = w_avg + psi (w - w_avg)                                         (README Eq. 5.5)
    L_D = E softplus(D(G(z))) + E softplus(-D(x)),  L_G = E softplus(-D(G(z)))   (README Eq. 5.6)
    R1 = gamma/2 E_x ||grad_x D(x)||^2, added as k R1 every k-th D step       (README Eq. 5.7, 5.8)

Run:   python 02_gans/stylegan.py                                (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 02_gans/stylegan.py --steps 4400 --channels 16 --batch-size 32 --lr 0.0025 --gamma 1 --mapping-layers 2 --mixing-prob 0 --mbstd-group 32 --log-every 1100
Measured on a 2-core CPU: 7 min 22 s (wall, whole command); varied strokes in every class, not yet recognizable:
FID 306.0, IS 5.608, precision 0.425, recall 0.110, confident 0.628 at N = 1000 (README section 5).
Writes out/stylegan/: ckpt.pt, samples.png, samples.npz, truncation.png, style_mixing.png.
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
    amp: bool = False  # bf16 autocast on CUDA
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/stylegan"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps (one D step and one G step each)
    batch_size: int = 64  # images per step
    lr: float = 0.002  # Adam learning rate (betas 0, 0.99, as in the paper); the mapping MLP uses lr / 100
    latent_dim: int = 128  # size of z and of w
    mapping_layers: int = 8  # layers of the mapping MLP f: z -> w (8 in the paper; 2 in StyleGAN2-ADA's 32 x 32 CIFAR-10 config)
    channels: int = 128  # feature maps at every resolution, in G and in D
    gamma: float = 0.01  # R1 weight: gamma/2 E||grad_x D(x)||^2 on real data (README Eq. 5.7); small for 32 x 32
    r1_every: int = 16  # lazy regularization: R1 every k-th D step, scaled by k (1 = every step; README Eq. 5.8)
    mixing_prob: float = 0.9  # probability that a training batch mixes two w's at a random layer (0.9 in the paper; 0 for CIFAR-10)
    ema_kimg: float = 10.0  # half-life of G's weight average, in thousands of images
    mbstd_group: int = 4  # group size of D's minibatch standard deviation feature (4 in the paper; 32 for CIFAR-10)
    psi: float = 1.0  # truncation psi for samples.png / samples.npz (1 = none; README Eq. 5.5)
    num_samples: int = 1000  # images for samples.npz
    log_every: int = 1000  # steps between checkpoints and sample grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if min(self.latent_dim, self.mapping_layers, self.channels, self.r1_every, self.mbstd_group) < 1:
            raise ValueError("--latent-dim, --mapping-layers, --channels, --r1-every and --mbstd-group must be at least 1")
        if self.gamma < 0 or not 0 <= self.mixing_prob <= 1 or not self.ema_kimg > 0:
            raise ValueError(f"need --gamma >= 0, 0 <= --mixing-prob <= 1 and --ema-kimg > 0, got "
                             f"{self.gamma}, {self.mixing_prob}, {self.ema_kimg}")


# --- Model ---


def lrelu(x):
    """Leaky ReLU with gain sqrt(2), so unit-variance activations keep about unit variance."""
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (Karras et al. 2018): weights stored as N(0, 1/lr_mul^2)
    and scaled by lr_mul / sqrt(fan_in) at run time, so Adam moves every layer at the same relative speed."""

    def __init__(self, d_in, d_out, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((d_out,), float(bias_init)))
        self.scale, self.lr_mul = lr_mul / math.sqrt(d_in), lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """k x k convolution, 'same' padding, equalized learning rate."""

    def __init__(self, c_in, c_out, k, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = 1 / math.sqrt(c_in * k * k)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


def modulate(weight, s, demodulate=True, eps=1e-8):
    """Eq. 5.2 then Eq. 5.4: w'_ijk = s_i w_ijk, w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps).
    weight (C_out, C_in, k, k), styles s (B, C_in) -> one weight per sample (B, C_out, C_in, k, k)."""
    w = weight[None] * s[:, None, :, None, None]
    if demodulate:
        w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + eps)
    return w


def modulated_conv2d(x, weight, s, demodulate=True):
    """A different conv for every sample, run as one grouped conv: the batch becomes the groups."""
    b, c_in, h, w_ = x.shape
    w = modulate(weight, s, demodulate)  # (B, C_out, C_in, k, k)
    out = F.conv2d(x.reshape(1, b * c_in, h, w_), w.flatten(0, 1), padding=weight.shape[-1] // 2, groups=b)
    return out.view(b, -1, h, w_)  # (B, C_out, H, W)


class StyledLayer(nn.Module):
    """[2x upsample] -> modulated conv -> demodulate -> + noise B -> + bias -> leaky ReLU.
    toRGB (rgb=True) is the 1x1 variant: modulated, not demodulated, no noise, no activation."""

    def __init__(self, c_in, c_out, w_dim, k=3, up=False, rgb=False):
        super().__init__()
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)  # A: w -> s, so styles start near 1
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.scale = 1 / math.sqrt(c_in * k * k)  # equalized learning rate
        self.noise_strength = nn.Parameter(torch.zeros(c_out))  # B: per-channel scale of the noise
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.up, self.rgb = up, rgb

    def forward(self, x, w):  # x (B, C_in, H, W), w (B, w_dim)
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = modulated_conv2d(x, self.weight * self.scale, self.affine(w), demodulate=not self.rgb)
        if self.rgb:
            return x + self.bias.view(1, -1, 1, 1)
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)  # one value per pixel
        return lrelu(x + self.noise_strength.view(1, -1, 1, 1) * noise + self.bias.view(1, -1, 1, 1))


class Generator(nn.Module):
    """Mapping f: z -> w, then synthesis from a learned constant through blocks at 4, 8, ..., resolution.
    Block b has styled convs and a toRGB; layer indices into ws follow the paper's code: toRGB of block b
    shares its w with the first conv of block b + 1, so there are num_ws = 2 x (number of blocks)."""

    def __init__(self, latent_dim=128, mapping_layers=8, channels=128, resolution=32, w_avg_beta=0.995):
        super().__init__()
        c, self.w_avg_beta = channels, w_avg_beta
        self.mapping = nn.ModuleList(EqualLinear(latent_dim, latent_dim, lr_mul=0.01) for _ in range(mapping_layers))
        self.register_buffer("w_avg", torch.zeros(latent_dim))  # running mean of w, for truncation
        self.const = nn.Parameter(torch.randn(1, c, 4, 4))
        self.num_blocks = int(math.log2(resolution)) - 1  # 4, 8, 16, 32 -> 4 blocks
        self.convs = nn.ModuleList([StyledLayer(c, c, latent_dim)] + [
            StyledLayer(c, c, latent_dim, up=(j % 2 == 0)) for j in range(2 * self.num_blocks - 2)])
        self.to_rgbs = nn.ModuleList(StyledLayer(c, 1, latent_dim, k=1, rgb=True) for _ in range(self.num_blocks))
        self.num_ws = 2 * self.num_blocks

    def map(self, z, psi=1.0):
        """Eq. 5.1: normalize z to unit root mean square, then the MLP; Eq. 5.5: truncate toward w_avg."""
        w = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)  # (B, latent_dim)
        for layer in self.mapping:
            w = lrelu(layer(w))
        if self.training:
            self.w_avg.lerp_(w.detach().mean(0).to(self.w_avg.dtype), 1 - self.w_avg_beta)
        return self.truncate(w, psi)

    def truncate(self, w, psi):
        return self.w_avg.to(w.dtype).lerp(w, psi)  # w_avg + psi (w - w_avg)

    def synthesis(self, ws):  # ws (B, num_ws, latent_dim) -> (B, 1, R, R)
        x = self.const.expand(ws.shape[0], -1, -1, -1)  # (B, C, 4, 4)
        x = self.convs[0](x, ws[:, 0])
        rgb = self.to_rgbs[0](x, ws[:, 1])  # (B, 1, 4, 4)
        for b in range(1, self.num_blocks):
            x = self.convs[2 * b - 1](x, ws[:, 2 * b - 1])  # upsample + conv: (B, C, 2H, 2W)
            x = self.convs[2 * b](x, ws[:, 2 * b])
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + self.to_rgbs[b](x, ws[:, 2 * b + 1])
        return rgb

    def forward(self, z, psi=1.0, mixing_prob=0.0):
        """z (B, latent_dim) -> image (B, 1, R, R). With probability mixing_prob, layers from a random
        crossover on get the w of a second z (style mixing)."""
        ws = self.map(z, psi)[:, None].repeat(1, self.num_ws, 1)  # (B, num_ws, latent_dim)
        if mixing_prob > 0 and torch.rand(()) < mixing_prob:
            crossover = int(torch.randint(1, self.num_ws, ()))
            ws[:, crossover:] = self.map(torch.randn_like(z), psi)[:, None]
        return self.synthesis(ws)


def minibatch_stddev(h, group):
    """Append one feature map: the std of every feature over a group of samples, averaged (Karras et al.
    2018). D can then see a batch that lacks variety, which discourages mode collapse."""
    b, c, height, width = h.shape
    g = math.gcd(group, b)
    std = (h.view(g, -1, c, height, width).var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
    return torch.cat([h, std.view(-1, 1, 1, 1).repeat(g, 1, height, width)], 1)  # (B, C + 1, H, W)


class DBlock(nn.Module):
    """Residual block: two 3x3 convs and a 2x average pool, plus a pooled 1x1 skip; sum / sqrt(2)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv0, self.conv1 = EqualConv2d(c_in, c_in, 3), EqualConv2d(c_in, c_out, 3)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        y = F.avg_pool2d(lrelu(self.conv1(lrelu(self.conv0(x)))), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class Discriminator(nn.Module):
    """fromRGB 1x1 -> residual blocks down to 4 x 4 -> minibatch stddev -> 3x3 conv -> two linear layers."""

    def __init__(self, channels=128, resolution=32, mbstd_group=4):
        super().__init__()
        c, self.mbstd_group = channels, mbstd_group
        self.from_rgb = EqualConv2d(1, c, 1)
        self.blocks = nn.Sequential(*[DBlock(c, c) for _ in range(int(math.log2(resolution)) - 2)])
        self.conv = EqualConv2d(c + 1, c, 3)
        self.fc, self.out = EqualLinear(16 * c, c), EqualLinear(c, 1)

    def forward(self, x):  # (B, 1, R, R) -> logits (B,)
        h = self.blocks(lrelu(self.from_rgb(x)))  # (B, C, 4, 4)
        h = lrelu(self.conv(minibatch_stddev(h, self.mbstd_group)))
        return self.out(lrelu(self.fc(h.flatten(1)))).squeeze(1)


# --- The method ---


def r1_penalty(real_logits, x):
    """Eq. 5.7 without gamma/2: E_x ||grad_x D(x)||^2, differentiable (create_graph) so D can descend it."""
    grad, = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


class StyleGAN2(nn.Module):
    def __init__(self, latent_dim=128, mapping_layers=8, channels=128, gamma=1.0, r1_every=16,
                 mixing_prob=0.9, mbstd_group=4, resolution=32):
        super().__init__()
        self.G = Generator(latent_dim, mapping_layers, channels, resolution)
        self.D = Discriminator(channels, resolution, mbstd_group)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)  # what we sample from
        self.latent_dim, self.gamma, self.r1_every, self.mixing_prob = latent_dim, gamma, r1_every, mixing_prob

    def noise(self, n):
        return torch.randn(n, self.latent_dim, device=self.G.const.device, dtype=self.G.const.dtype)

    def d_loss(self, x, regularize=False):
        """Eq. 5.6 for D; when regularize (every r1_every-th step), + r1_every * gamma/2 * R1 (Eq. 5.7, 5.8).
        Returns (loss, R1) with R1 = E||grad_x D(x)||^2 (0 on other steps)."""
        with torch.no_grad():
            fake = self.G(self.noise(len(x)), mixing_prob=self.mixing_prob)
        x = x.detach().requires_grad_(regularize)
        real_logits = self.D(x)
        loss = F.softplus(self.D(fake)).mean() + F.softplus(-real_logits).mean()
        r1 = r1_penalty(real_logits, x) if regularize else torch.zeros((), device=x.device)
        return loss + self.r1_every * self.gamma / 2 * r1, r1

    def g_loss(self, batch_size):
        """Eq. 5.6 for G: the non-saturating loss E softplus(-D(G(z)))."""
        return F.softplus(-self.D(self.G(self.noise(batch_size), mixing_prob=self.mixing_prob))).mean()

    @torch.no_grad()
    def update_ema(self, beta):
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p, 1 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)  # w_avg

    @torch.no_grad()
    def sample(self, n, psi=1.0, batch_size=500):
        """n digits from the averaged generator, in [0, 1], cropped back to (n, 1, 28, 28)."""
        images = torch.cat([self.G_ema(self.noise(min(batch_size, n - i)), psi) for i in range(0, n, batch_size)])
        return (images[:, :, 2:30, 2:30].float().clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def style_mixing_grid(self, n=6, crossover=4):
        """Row i, column j: w of row source i for layers < crossover (4 x 4 and 8 x 8), of column source j
        after it. The first row and column show the sources themselves."""
        g = self.G_ema
        w_rows, w_cols = g.map(self.noise(n)), g.map(self.noise(n))
        ws = torch.cat([w_rows[:, None, None].expand(n, n, crossover, -1),
                        w_cols[None, :, None].expand(n, n, g.num_ws - crossover, -1)], 2).flatten(0, 1)
        sources = [g.synthesis(w[:, None].repeat(1, g.num_ws, 1)) for w in (w_rows, w_cols)]  # (n, 1, R, R) each
        cells = g.synthesis(ws).view(n, n, *sources[0].shape[1:])
        top = torch.cat([torch.ones_like(sources[1][:1]), sources[1]])  # a blank corner, then the column sources
        grid = torch.cat([top[None], torch.cat([sources[0][:, None], cells], 1)])  # (n + 1, n + 1, 1, R, R)
        return (grid.flatten(0, 1)[:, :, 2:30, 2:30].clamp(-1, 1) + 1) / 2


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28)
    x_train = F.pad(x_train, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32) in [-1, 1], background -1

    gan = StyleGAN2(cfg.latent_dim, cfg.mapping_layers, cfg.channels, cfg.gamma, cfg.r1_every,
                    cfg.mixing_prob, cfg.mbstd_group).to(device)
    # R1 is folded into the ordinary D step, so D takes no extra optimizer steps and needs none of the
    # paper's Adam rescaling (c = k / (k + 1), which compensates for a separate regularization step)
    opt_G = torch.optim.Adam(gan.G.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8)
    opt_D = torch.optim.Adam(gan.D.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8)
    step, d_loss, g_loss, r1 = 0, float("nan"), float("nan"), float("nan")
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        gan.G.load_state_dict(ckpt["model"]["G"])
        gan.D.load_state_dict(ckpt["model"]["D"])
        gan.G_ema.load_state_dict(ckpt["ema"])
        opt_G.load_state_dict(ckpt["optimizer"]["G"])
        opt_D.load_state_dict(ckpt["optimizer"]["D"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {"G": gan.G.state_dict(), "D": gan.D.state_dict()},
                                          "ema": gan.G_ema.state_dict(), "config": asdict(cfg), "step": step,
                                          "optimizer": {"G": opt_G.state_dict(), "D": opt_D.state_dict()}})

    def check(loss, name):
        if not torch.isfinite(loss):
            raise SystemExit(f"error: {name} loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")

    t0 = time.time()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="stylegan")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. D step on a random batch of real digits and a batch of fakes; R1 every r1_every-th step
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            regularize = step % cfg.r1_every == 0
            with autocast:
                loss_D, r1_now = gan.d_loss(x, regularize)
            check(loss_D, "D")
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()
            # 2. G step: fresh fakes, non-saturating loss through the updated D
            with autocast:
                loss_G = gan.g_loss(cfg.batch_size)
            check(loss_G, "G")
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            opt_G.step()
            # 3. average G's weights into G_ema: half-life ema_kimg thousand images, ramped up over the
            #    first images (at most 5 % of the images seen so far, as in StyleGAN2-ADA)
            half_life = min(cfg.ema_kimg * 1000, 0.05 * step * cfg.batch_size)
            gan.update_ema(0.5 ** (cfg.batch_size / half_life) if half_life > 0 else 0.0)
            step += 1
            d_loss, g_loss = loss_D.item(), loss_G.item()
            r1 = r1_now.item() if regularize else r1
            bar.update(1)
            bar.set_postfix(d=f"{d_loss:.3f}", g=f"{g_loss:.3f}", r1=f"{r1:.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"step {step}: D loss {d_loss:.3f}, G loss {g_loss:.3f}, R1 {r1:.4f}")
                save_grid(gan.sample(64, cfg.psi), out / "samples.png", nrow=8)
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    print(f"{step} steps, {time.time() - t0:.0f} s")
    checkpoint()

    samples = gan.sample(cfg.num_samples, cfg.psi)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    # truncation rows: the same 8 z's (same seed, same noise) at psi = 1, 0.75, 0.5, 0.25, 0 (README Eq. 5.5)
    rows = []
    for psi in (1.0, 0.75, 0.5, 0.25, 0.0):
        torch.manual_seed(cfg.seed)
        rows.append(gan.sample(8, psi))
    save_grid(torch.cat(rows), out / "truncation.png", nrow=8)
    save_grid(gan.style_mixing_grid(), out / "style_mixing.png", nrow=7)
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'}, {out / 'truncation.png'} and {out / 'style_mixing.png'}")
    return {"d_loss": d_loss, "g_loss": g_loss, "r1": r1, "step": step}


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
