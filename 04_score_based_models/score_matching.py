"""
Score matching: learn the score grad_x log p(x) of 2-D toy data four ways, without ever normalizing p.

Papers: Hyvarinen, "Estimation of Non-Normalized Statistical Models by Score Matching", JMLR 2005
(no arXiv id); Vincent, "A Connection Between Score Matching and Denoising Autoencoders", Neural
Computation 2011 (no arXiv id); Song, Garg, Shi and Ermon, "Sliced Score Matching: A Scalable Approach
to Density and Score Estimation", UAI 2019, arXiv:1905.07088.

The idea: a network s_theta(x) in R^2 is trained to match the score grad_x log p(x), a quantity in
which the normalizing constant of p cancels. The error is the Fisher divergence (README Eq. 1.2).
We cannot evaluate it without the true score, but four objectives share its minimizer:
    explicit   1/2 ||s_theta(x) - grad log p(x)||^2    (true score known: the 8-Gaussian mixture)   (Eq. 1.3)
    implicit   tr(grad_x s_theta(x)) + 1/2 ||s_theta(x)||^2   (Hyvarinen; exact trace, D = 2)    (Eq. 1.6)
    sliced     v^T grad_x s_theta(x) v + 1/2 ||s_theta(x)||^2, v ~ N(0, I) (the variance-reduced
               form SSM-VR; --no-variance-reduced: 1/2 (v^T s_theta(x))^2)                        (Eq. 1.8)
    denoising  1/2 ||s_theta(x + sigma eps) + eps / sigma||^2, eps ~ N(0, I)   (Vincent)          (Eq. 1.10)
Explicit, implicit and sliced all recover grad log p; denoising recovers the score of the smoothed
density q_sigma = p * N(0, sigma^2 I) (Eq. 1.12), so its error is reported against both. For the
mixture, grad log q_sigma is again a mixture score with variances s^2 + sigma^2 (mixture_score).
There is no sampler here (Langevin dynamics is langevin.py), so no samples.npz is written.

Run:   python 04_score_based_models/score_matching.py          (all four methods; defaults sized for one GPU)
Other data: --dataset moons | swissroll | checkerboard | rings (implicit, sliced, denoising only).
CPU recipe: python 04_score_based_models/score_matching.py --steps 4000 --hidden 128
Measured on a 2-core CPU: 1 min 51 s; Fisher divergence (zero field 15.37): explicit 0.046, implicit 0.189, sliced 0.215, dsm 0.353 (0.194 to grad log q_sigma).
Writes out/score_matching/: ckpt.pt, errors.json, fields.png (2 x 2 panels), score_field.svg.
"""

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy); every method starts from the same network weights
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA (objectives and errors stay float32)
    out_dir: str = "out/score_matching"  # checkpoint, errors.json and the figures go here
    dataset: str = "8gaussians"  # 8gaussians (analytic score known) | moons | swissroll | checkerboard | rings
    method: str = "all"  # all | explicit | implicit | sliced | dsm
    steps: int = 20000  # optimizer steps (each method takes this many)
    batch_size: int = 1024  # points per step
    lr: float = 1e-3  # Adam learning rate at the start, decayed to 0 on a cosine over the steps
    hidden: int = 256  # width of the three hidden layers of s_theta
    sigma: float = 0.1  # denoising noise level (the data's own std is 0.354 for 8gaussians)
    projections: int = 1  # random directions v per point for sliced score matching
    variance_reduced: bool = True  # sliced: replace 1/2 (v^T s)^2 by its mean over v, 1/2 ||s||^2 (SSM-VR)
    n_train: int = 50000  # training points (a fixed set; the errors use fresh ones)
    n_eval: int = 20000  # fresh points for the Fisher divergence (Eq. 1.2)
    log_every: int = 1000  # steps between error reports and checkpoints
    sample_only: bool = False  # skip training; evaluate and draw from out_dir/ckpt.pt (there is no sampler)
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.dataset not in TOY_2D_NAMES:
            raise ValueError(f"--dataset must be one of {', '.join(TOY_2D_NAMES)}, got {self.dataset!r}")
        if self.method not in ("all",) + METHODS:
            raise ValueError(f"--method must be all, {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "explicit" and self.dataset != "8gaussians":
            raise ValueError(f"--method explicit needs the analytic score, which only --dataset 8gaussians has "
                             f"(got {self.dataset!r}); use implicit, sliced or dsm")
        if not self.sigma > 0:
            raise ValueError(f"--sigma must be positive, got {self.sigma}")
        for name in ("hidden", "projections", "n_train", "n_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def methods(self):
        if self.method != "all":
            return (self.method,)
        return METHODS if self.dataset == "8gaussians" else METHODS[1:]  # explicit needs the true score


TOY_2D_NAMES = ("8gaussians", "moons", "swissroll", "checkerboard", "rings")
METHODS = ("explicit", "implicit", "sliced", "dsm")
MIXTURE_STD = math.sqrt(2) / 4  # s, the std of each of the 8 Gaussians (toy_2d)


# --- The analytic score of the 8-Gaussian mixture ---


def mixture_centres(dtype=torch.float64, device="cpu"):  # (8, 2), the same constants as toy_2d
    angle = torch.arange(8, dtype=dtype, device=device) * math.pi / 4
    return 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)


def mixture_score(x, sigma=0.0):
    """grad_x log q_sigma(x) for the 8-Gaussian mixture smoothed by N(0, sigma^2 I) (sigma = 0: p itself),
    (N, 2) -> (N, 2) in x's dtype (README Eq. 1.13). Smoothing a Gaussian component adds variances, so
    q_sigma is the same mixture with variance v = s^2 + sigma^2, and its score is the posterior-weighted
    sum of the component scores: sum_k r_k(x) (-(x - mu_k) / v), r_k = softmax_k(-||x - mu_k||^2 / 2v)."""
    mu = mixture_centres(x.dtype, x.device)
    var = MIXTURE_STD ** 2 + sigma ** 2
    diff = x[:, None, :] - mu  # (N, 8, 2)
    r = torch.softmax(-diff.pow(2).sum(-1) / (2 * var), 1)  # (N, 8) posterior p(k | x); equal weights cancel
    return -(r[:, :, None] * diff).sum(1) / var


# --- Model ---


class ScoreNet(nn.Sequential):
    """s_theta: R^2 -> R^2, three hidden layers. SiLU, not ReLU: the implicit and sliced objectives train
    the Jacobian grad_x s_theta itself, and a ReLU network's Jacobian is piecewise constant in x, jumping
    at every kink; a smooth activation gives a smooth one."""

    def __init__(self, hidden=256):
        super().__init__(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))


# --- The method ---
# Each objective returns one value per point, (B,), so the tests can attach standard errors.
# `score` is any function (B, 2) -> (B, 2): a network, or an analytic score.


def explicit_objective(score, x, true_score):
    """Eq. 1.3: 1/2 ||s_theta(x) - grad log p(x)||^2; needs the true score."""
    return 0.5 * (score(x).float() - true_score(x)).pow(2).sum(1)


def implicit_objective(score, x):
    """Eq. 1.6 (Hyvarinen 2005): tr(grad_x s(x)) + 1/2 ||s(x)||^2, the trace exact: one backward pass
    per dimension, each giving one row of the Jacobian, of which we keep the diagonal entry."""
    x = x.detach().requires_grad_(True)
    s = score(x).float()  # (B, D)
    trace = sum(torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    return trace + 0.5 * s.pow(2).sum(1)


def sliced_objective(score, x, projections=1, variance_reduced=True):
    """Eq. 1.8 (Song et al. 2019, SSM and its variance-reduced form SSM-VR): v^T grad_x s(x) v + 1/2 (v^T s(x))^2 averaged over
    Gaussian directions v, or with the exact mean 1/2 ||s||^2 of the second term (variance_reduced).
    One backward pass per direction gives v^T J for all points at once: cost independent of D."""
    x = x.detach().requires_grad_(True)
    s = score(x).float()  # (B, D)
    total = 0.0
    for _ in range(projections):
        v = torch.randn_like(s)  # (B, D), E[v v^T] = I
        vJ = torch.autograd.grad((v * s).sum(), x, create_graph=True)[0]  # (B, D) row v^T grad_x s
        second = 0.5 * s.pow(2).sum(1) if variance_reduced else 0.5 * (v * s).sum(1).pow(2)
        total = total + (vJ * v).sum(1) + second
    return total / projections


def dsm_objective(score, x, sigma):
    """Eq. 1.10 (Vincent 2011): perturb x~ = x + sigma eps; the score of q(x~ | x) = N(x, sigma^2 I) is
    -(x~ - x) / sigma^2 = -eps / sigma, so the target for s(x~) is -eps / sigma."""
    eps = torch.randn_like(x)
    x_noisy = x + sigma * eps
    return 0.5 * (score(x_noisy).float() + eps / sigma).pow(2).sum(1)


class ScoreMatching(nn.Module):
    """A score network trained by one of the four objectives (all minimized by grad log p, or by
    grad log q_sigma for dsm)."""

    def __init__(self, method, hidden=256, sigma=0.1, projections=1, variance_reduced=True):
        super().__init__()
        self.method, self.sigma, self.projections, self.variance_reduced = method, sigma, projections, variance_reduced
        self.net = ScoreNet(hidden)

    def forward(self, x):  # (B, 2) -> (B, 2), s_theta(x)
        return self.net(x)

    def loss(self, x):
        if self.method == "explicit":
            return explicit_objective(self, x, mixture_score).mean()
        if self.method == "implicit":
            return implicit_objective(self, x).mean()
        if self.method == "sliced":
            return sliced_objective(self, x, self.projections, self.variance_reduced).mean()
        return dsm_objective(self, x, self.sigma).mean()


@torch.no_grad()
def fisher_divergence(score, x, true_score):
    """Eq. 1.2 estimated on samples x ~ p: mean of ||s(x) - grad log p(x)||^2 (no 1/2)."""
    return (score(x).float() - true_score(x)).pow(2).sum(1).mean().item()


def errors(models, x, sigma):
    """Every method's Fisher divergence to grad log p, and dsm's also to grad log q_sigma; with the
    divergence of the zero field, E||grad log p||^2, for scale."""
    result = {"zero_field": mixture_score(x).pow(2).sum(1).mean().item()}
    for name, model in models.items():
        result[name] = fisher_divergence(model, x, mixture_score)
        if name == "dsm":
            result["dsm_vs_smoothed"] = fisher_divergence(model, x, lambda y: mixture_score(y, sigma))
    return result


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(cfg.seed)
    x_train = toy_2d(cfg.dataset, cfg.n_train, g).to(device)  # (N, 2)
    x_eval = toy_2d(cfg.dataset, cfg.n_eval, g).to(device)  # (M, 2), fresh points for the errors
    analytic = cfg.dataset == "8gaussians"

    models, optimizers = {}, {}
    for name in cfg.methods():
        torch.manual_seed(cfg.seed)  # the same initial network for every method
        models[name] = ScoreMatching(name, cfg.hidden, cfg.sigma, cfg.projections, cfg.variance_reduced).to(device)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        if set(ckpt["model"]) != set(models):
            raise SystemExit(f"error: {out / 'ckpt.pt'} holds {sorted(ckpt['model'])}, not {sorted(models)}")
        for name in models:
            models[name].load_state_dict(ckpt["model"][name])
            optimizers[name].load_state_dict(ckpt["optimizer"][name])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {k: m.state_dict() for k, m in models.items()},
                                          "optimizer": {k: o.state_dict() for k, o in optimizers.items()},
                                          "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="score_matching")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. one random batch of training points, shared by every method
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))  # cosine decay: quiets the noisy dsm targets
            losses = {}
            for name, model in models.items():
                # 2. the method's objective (Eq. 1.3, 1.6, 1.8 or 1.10), averaged over the batch
                with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                    loss = model.loss(x)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: {name} loss is {loss.item()} at step {step}; "
                                     f"the last good checkpoint is {out / 'ckpt.pt'}")
                # 3. one Adam step for this method's network
                for group in optimizers[name].param_groups:
                    group["lr"] = lr
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                losses[name] = f"{loss.item():.3f}"
            step += 1
            bar.update(1)
            bar.set_postfix(losses, refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if analytic:
                    e = errors(models, x_eval, cfg.sigma)
                    bar.write(f"step {step}: Fisher divergence " + ", ".join(f"{k} {e[k]:.4f}" for k in models))
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    checkpoint()

    result = {"step": step, "dataset": cfg.dataset}
    if analytic:
        result.update(errors(models, x_eval, cfg.sigma))
        print(f"Fisher divergence E_p ||s_theta - grad log p||^2 on {cfg.n_eval} fresh points, after {step} steps "
              f"(zero field: {result['zero_field']:.3f}):")
        for name in models:
            print(f"  {name:9s} {result[name]:.4f}  ({100 * result[name] / result['zero_field']:.2f} % of the zero field's)")
        if "dsm" in models:
            print(f"  dsm vs grad log q_sigma (sigma = {cfg.sigma}, what it learns): {result['dsm_vs_smoothed']:.4f}")
    else:
        print(f"{cfg.dataset} has no analytic score: no error is reported (trained {', '.join(models)}, {step} steps)")
    print(f"{time.time() - t0:.0f} s")
    (out / "errors.json").write_text(json.dumps(result, indent=2) + "\n")
    for model in models.values():
        model.cpu()  # the figures are drawn on the CPU
    draw_fields(models, x_eval[:3000].cpu(), cfg, result, out / "fields.png")
    save_field_svg(models, x_eval[:1500].cpu(), cfg, out / "score_field.svg")
    print(f"wrote {out / 'errors.json'}, {out / 'fields.png'} and {out / 'score_field.svg'}")
    return result


# --- Figures ---


def field_on_grid(score, n=17, extent=4.0):
    """Grid points (n*n, 2) over [-extent, extent]^2 and the field there, on the CPU."""
    ticks = (torch.arange(n) + 0.5) / n * 2 * extent - extent
    grid = torch.cartesian_prod(ticks, ticks)  # (n*n, 2)
    with torch.no_grad():
        return grid, score(grid).float()


def arrows(grid, field, scale, cell):
    """(n*n, 8): tail, tip and the two ends of the head of each arrow, in data coordinates. Arrows are
    field * scale, clipped at 1.5 grid cells: the score grows linearly away from the data and would
    otherwise hide everything else."""
    d = field * scale
    d = d * (1.5 * cell / d.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
    tip = grid + d
    left = tip - 0.3 * d @ torch.tensor([[0.91, 0.42], [-0.42, 0.91]])  # the shaft rotated by +-25 degrees
    right = tip - 0.3 * d @ torch.tensor([[0.91, -0.42], [0.42, 0.91]])
    return torch.cat([grid, tip, left, right], 1)


def field_scale(field, cell):
    """The factor that makes the median of the longest tenth of the arrows one grid cell long."""
    top = field.norm(dim=1).sort().values[-max(1, len(field) // 10):]
    return cell / top.median().clamp(min=1e-12).item()


def draw_fields(models, points, cfg, result, path, size=320, extent=4.0, n=15):
    """One panel per method: the learned field (dark red arrows) and, for 8gaussians, the analytic
    grad log p (light blue, thinner) over the true density; other data over their samples."""
    def to_pixel(xy):  # data coordinates -> pixel column and row, y up
        return (xy[..., 0] + extent) / (2 * extent) * size, (extent - xy[..., 1]) / (2 * extent) * size

    analytic = cfg.dataset == "8gaussians"
    cell = 2 * extent / n
    background = np.full((size, size, 3), 255, dtype=np.uint8)
    if analytic:
        centres = (torch.arange(size) + 0.5) / size * 2 * extent - extent
        xx, yy = torch.meshgrid(centres, centres.flip(0), indexing="xy")
        density = toy_2d_log_prob("8gaussians", torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).exp().view(size, size)
        t = (density / density.max()).sqrt().numpy()[..., None]
        background = ((1 - t) * np.array([255, 255, 255.0]) + t * np.array([250, 200, 90.0])).round().astype(np.uint8)
    else:
        u, v = to_pixel(points)
        keep = (u >= 0) & (u < size) & (v >= 0) & (v < size)
        background[v[keep].long().numpy(), u[keep].long().numpy()] = (170, 170, 170)
    grid, true_field = field_on_grid(mixture_score, n, extent) if analytic else (None, None)
    gap, label = 8, 18
    figure = Image.new("RGB", (2 * size + 3 * gap, 2 * (size + label) + gap), "white")
    draw = ImageDraw.Draw(figure)
    for i, (name, model) in enumerate(models.items()):
        x0, y0 = gap + (i % 2) * (size + gap), (i // 2) * (size + label + gap // 2)
        figure.paste(Image.fromarray(background), (x0, y0 + label))
        grid, field = field_on_grid(model, n, extent)
        scale = field_scale(true_field if analytic else field, cell)
        layers = [(field, (150, 20, 20), 2)]
        if analytic:
            layers.insert(0, (true_field, (80, 140, 230), 1))
        for vectors, colour, width in layers:
            for seg in arrows(grid, vectors, scale, cell):
                (a, b), (c, d), (e, f), (g_, h) = [to_pixel(seg[k:k + 2]) for k in (0, 2, 4, 6)]
                draw.line([(x0 + a, y0 + label + b), (x0 + c, y0 + label + d)], fill=colour, width=width)
                draw.line([(x0 + e, y0 + label + f), (x0 + c, y0 + label + d), (x0 + g_, y0 + label + h)], fill=colour, width=width)
        title = {"explicit": "explicit SM", "implicit": "implicit SM (Hyvarinen)", "sliced": "sliced SM",
                 "dsm": f"denoising SM, sigma = {cfg.sigma}"}[name]
        if analytic:
            title += f": Fisher div. {result[name]:.3f}"
        draw.text((x0, y0 + 3), title, fill="black")
    figure.save(path)


def save_field_svg(models, points, cfg, path, panel=300, extent=4.0, n=15):
    """The learned field (dsm if trained, else the first method) as SVG arrows over samples of the data,
    beside the analytic grad log p for 8gaussians. Arrows are one path per field (~50 bytes each)."""
    name = "dsm" if "dsm" in models else next(iter(models))
    fields = [(f"learned by {name} score matching", models[name], "#B91C1C")]
    if cfg.dataset == "8gaussians":
        fields.append(("analytic score of the mixture", mixture_score, "#1D4ED8"))
    cell = 2 * extent / n
    width, height = len(fields) * (panel + 10) + 10, panel + 38
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'font-family="Helvetica, Arial, sans-serif" font-size="13">', '<rect width="100%" height="100%" fill="white"/>']
    scale = None
    for k, (title, score, colour) in enumerate(reversed(fields)):  # the analytic field sets the common scale
        x0, y0 = 10 + (len(fields) - 1 - k) * (panel + 10), 28
        grid, field = field_on_grid(score, n, extent)
        scale = scale or field_scale(field, cell)

        def px(xy):
            return x0 + (xy[..., 0] + extent) / (2 * extent) * panel, y0 + (extent - xy[..., 1]) / (2 * extent) * panel
        parts.append(f'<text x="{x0 + panel / 2}" y="{y0 - 8}" text-anchor="middle" fill="#1E293B">{title}</text>')
        parts.append(f'<rect x="{x0}" y="{y0}" width="{panel}" height="{panel}" fill="#F8FAFC" stroke="#CBD5E1"/>')
        u, v = px(points)
        keep = (u > x0) & (u < x0 + panel) & (v > y0) & (v < y0 + panel)
        dots = "".join(f"M{a:.0f} {b:.0f}h0" for a, b in zip(u[keep].tolist(), v[keep].tolist()))
        parts.append(f'<path d="{dots}" stroke="#CBD5E1" stroke-width="2.4" stroke-linecap="round"/>')
        d = []
        for seg in arrows(grid, field, scale, cell):
            (a, b), (c, e), (f, g_), (h, i) = [px(seg[j:j + 2]) for j in (0, 2, 4, 6)]
            d.append(f"M{a:.1f} {b:.1f}L{c:.1f} {e:.1f}M{f:.1f} {g_:.1f}L{c:.1f} {e:.1f}L{h:.1f} {i:.1f}")
        parts.append(f'<path d="{"".join(d)}" stroke="{colour}" stroke-width="1.3" fill="none"/>')
    Path(path).write_text("\n".join(parts + ["</svg>"]) + "\n")


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
