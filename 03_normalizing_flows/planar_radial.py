"""
Planar and radial flows: variational inference with normalizing flows on the 2-D test energies.

Paper: Rezende and Mohamed, "Variational Inference with Normalizing Flows", ICML 2015, arXiv:1505.05770.

The idea: start from a standard Gaussian q0 and push its samples through K small invertible maps. A
planar layer bends space along one hyperplane, a radial layer around one point; each has a Jacobian
determinant in closed form, so the density q_K of what comes out is exact (README Eq. 1.4). Given only
an unnormalized target p(z) = exp(-U(z)) / Z, fit q_K by maximizing the ELBO, a reverse KL that needs
samples of q_K and their log-density, never samples of p (README Eq. 2.13). Training needs only the
forward direction; the inverses have no closed form in general, and the script finds them by 1-D root
finding (planar: bisection along w; radial: a quadratic in the radius) to draw q_K's density on a grid.

    planar:  f(z) = z + û tanh(wᵀz + b),  log|det| = log(1 + ûᵀ ψ(z)),  ψ = tanh'(wᵀz + b) w   (README Eq. 2.3)
    radial:  f(z) = z + β (z - z0) / (α + r),  r = ||z - z0||,
             log|det| = (d - 1) log(1 + β / (α + r)) + log(1 + αβ / (α + r)²)                (README Eq. 2.9)
    ELBO = E_{z0 ~ q0}[-U(z_K) - log q0(z0) + Σ_k log|det ∂z_k/∂z_{k-1}|] = log Z - KL(q_K || p) (README Eq. 2.13)

Training anneals the energy as the paper does: β_t U with β_t = min(1, 0.01 + t / anneal_steps) (the
paper's anneal_steps is 10000; the CPU recipe scales it to its shorter run). log Z comes from quadrature
on a grid, so the KL gap is reported in nats. U2 to U4 barely depend on z1 and are not normalizable on
the whole plane; a soft wall at |z1| = 4 (the paper's plotting window) makes them proper (README Eq. 2.12).

Run:   python 03_normalizing_flows/planar_radial.py                  (defaults sized for one GPU)
CPU recipe: python 03_normalizing_flows/planar_radial.py --steps 2500 --batch-size 256 --anneal-steps 1250 --lr 3e-3
Measured on a 2-core CPU: 2 min 7 s (planar, K = 32, all four energies); KL(q_K || p) = log Z - ELBO in nats,
U1 0.012, U2 0.011, U3 0.167, U4 0.113 (s.e. <= 0.0022); mass of q_K on [-8, 8]^2 via the inverse 0.9997 to 1.0001.
Writes out/planar_radial/: ckpt.pt, samples.png (target and q_K side by side per energy), samples.npz.
"""

import argparse
import copy
import dataclasses
import functools
import inspect
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
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm


# --- Config ---


ENERGIES = ("U1", "U2", "U3", "U4")


@dataclass
class Config:
    seed: int = 0  # random seed (torch)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    out_dir: str = "out/planar_radial"  # checkpoint, figure and samples go here
    steps: int = 20000  # optimizer steps per energy
    batch_size: int = 1000  # samples z0 ~ q0 per step (the Monte Carlo estimate of the ELBO)
    lr: float = 1e-3  # Adam learning rate
    flow: str = "planar"  # planar | radial
    layers: int = 32  # K, the number of flow layers (the paper uses 2 to 32)
    energy: str = "all"  # U1 | U2 | U3 | U4 | all (the four, trained one after another)
    anneal_steps: int = 10000  # beta_t = min(1, 0.01 + t / anneal_steps) weighs U (README Eq. 2.14); paper: 10000
    eval_samples: int = 100000  # samples for the final ELBO and its standard error
    grid: int = 160  # pixels per side of each density panel in samples.png
    num_samples: int = 10000  # samples of each q_K saved in samples.npz
    log_every: int = 1000  # steps between ELBO reports and checkpoints
    sample_only: bool = False  # skip training; evaluate and draw from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.flow not in ("planar", "radial"):
            raise ValueError(f"--flow must be planar or radial, got {self.flow!r}")
        if self.energy not in ENERGIES + ("all",):
            raise ValueError(f"--energy must be one of {', '.join(ENERGIES)} or all, got {self.energy!r}")
        for name, low in (("layers", 1), ("anneal_steps", 1), ("eval_samples", 2), ("grid", 8)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")


# --- The target: the test energies of the paper's Table 1 ---


def w1(z):
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def w2(z):
    return 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)


def w3(z):
    return 3 * torch.sigmoid((z[:, 0] - 1) / 0.3)


WALL, WALL_WIDTH = 4.0, 0.5  # the soft wall: U += ((|z1| - 4)_+ / 0.5)^2 / 2 (README Eq. 2.12)


def energy(name, z):  # (B, 2) -> (B,)
    """U(z) of Table 1, p(z) = exp(-U(z)) / Z. The paper's ln(e^a + e^b) is a logsumexp (no underflow)."""
    z1, z2 = z[:, 0], z[:, 1]
    if name == "U1":  # two arcs of a ring of radius 2, around z1 = -2 and z1 = 2
        u = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2 - torch.logsumexp(
            torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2]), 0)
    elif name == "U2":  # a sine wave
        u = 0.5 * ((z2 - w1(z)) / 0.4) ** 2
    elif name == "U3":  # the sine wave and a copy pushed down by a bump
        u = -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1(z)) / 0.35) ** 2,
                                          -0.5 * ((z2 - w1(z) + w2(z)) / 0.35) ** 2]), 0)
    elif name == "U4":  # the sine wave and a copy pushed down by a step
        u = -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1(z)) / 0.4) ** 2,
                                          -0.5 * ((z2 - w1(z) + w3(z)) / 0.35) ** 2]), 0)
    else:
        raise ValueError(f"unknown energy {name!r}")
    return u + 0.5 * (F.relu(z1.abs() - WALL) / WALL_WIDTH) ** 2


def grid_points(lim, n, dtype=torch.float64):  # -> (n * n, 2), rows from top (high z2) to bottom
    """Centres of an n x n grid of cells covering [-lim, lim]^2, and the cell area."""
    c = (torch.arange(n, dtype=dtype) + 0.5) / n * 2 * lim - lim
    z2, z1 = torch.meshgrid(c.flip(0), c, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], 1), (2 * lim / n) ** 2


@functools.lru_cache  # the same few integrals are asked for again and again
def log_partition(name, lim=8.0, n=800):
    """log Z = log ∫ exp(-U(z)) dz by the midpoint rule on [-lim, lim]^2 (README Eq. 2.15). The integrand
    is smooth and negligible at the edges, so the rule's error is far below the Monte Carlo noise."""
    z, area = grid_points(lim, n)
    return (torch.logsumexp(-energy(name, z), 0) + math.log(area)).item()


# --- Model ---


def standard_normal_log_prob(z):  # (B, D) -> (B,)
    return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def bisect_increasing(g, target, lo, hi, iters=64):
    """Solve g(a) = target elementwise for a in [lo, hi], g increasing, g(lo) <= target <= g(hi).
    64 halvings shrink the bracket by 2^-64 < eps / 1000: full float64 precision relative to its size."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = g(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


class PlanarLayer(nn.Module):
    """f(z) = z + û tanh(wᵀz + b) (README Eq. 2.1). u is free; û moves it along w so that
    wᵀû = m(wᵀu) = -1 + softplus(wᵀu) > -1, the condition for f to be invertible (Eq. 2.4)."""

    def __init__(self, dim=2):
        super().__init__()
        w = torch.randn(dim)
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(math.log(math.e - 1) * w / w.dot(w))  # m(wᵀu) = 0: û = 0, f = identity
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self):  # (D,), Eq. 2.5
        wu = self.w @ self.u
        return self.u + (F.softplus(wu) - 1 - wu) * self.w / (self.w @ self.w)

    def along_w(self, a):
        """The map restricted to the line along w: a = wᵀz + b goes to a + wᵀû tanh(a) (Eq. 2.6).
        Its derivative is 1 + wᵀû (1 - tanh² a) > 0 because wᵀû > -1: strictly increasing."""
        return a + (self.w @ self.u_hat()) * torch.tanh(a)

    def forward(self, z):  # (B, D) -> (B, D), (B,)
        u = self.u_hat()
        a = z @ self.w + self.b  # (B,)
        y = z + u * torch.tanh(a)[:, None]
        psi = (1 - torch.tanh(a) ** 2)[:, None] * self.w  # (B, D): ψ(z) = h'(wᵀz + b) w
        return y, torch.log1p(psi @ u)  # Eq. 2.3: det = 1 + ûᵀψ(z) > 0

    def inverse(self, y):  # (B, D) -> (B, D)
        """Eq. 2.7: y - z is parallel to û, so wᵀy + b = a + wᵀû tanh(a) with a = wᵀz + b; solve for a
        (|a - (wᵀy + b)| < |wᵀû| brackets it), then z = y - û tanh(a)."""
        u = self.u_hat()
        s = y @ self.w + self.b  # (B,)
        c = self.w @ u
        with torch.no_grad():
            a = bisect_increasing(self.along_w, s, s - c.abs(), s + c.abs())
        # one Newton step from the root leaves a unchanged, but lets autograd see da/ds = 1 / g'(a)
        # (the implicit function theorem) instead of differentiating through the bisection's branches
        a = a - (self.along_w(a) - s) / (1 + c * (1 - torch.tanh(a) ** 2))
        return y - u * torch.tanh(a)[:, None]


class RadialLayer(nn.Module):
    """f(z) = z + β h(α, r) (z - z0), h = 1 / (α + r), r = ||z - z0|| (README Eq. 2.8). α = softplus(α̂)
    > 0 and β = -α + softplus(β̂) > -α, the condition for f to be invertible (Eq. 2.10)."""

    def __init__(self, dim=2):
        super().__init__()
        self.z0 = nn.Parameter(torch.randn(dim))
        self.alpha_hat = nn.Parameter(torch.randn(()))
        self.beta_hat = nn.Parameter(self.alpha_hat.detach().clone())  # β = 0: f = identity

    def alpha_beta(self):
        alpha = F.softplus(self.alpha_hat)
        return alpha, -alpha + F.softplus(self.beta_hat)

    def radius_map(self, r):
        """The map along a ray from z0: r goes to ρ = r (1 + β / (α + r)) (Eq. 2.11). Its derivative is
        1 + αβ / (α + r)² > 1 - α² / (α + r)² >= 0 because β > -α: strictly increasing."""
        alpha, beta = self.alpha_beta()
        return r * (1 + beta / (alpha + r))

    def forward(self, z):  # (B, D) -> (B, D), (B,)
        alpha, beta = self.alpha_beta()
        diff = z - self.z0  # (B, D)
        h = 1 / (alpha + diff.norm(dim=1))  # (B,)
        y = z + (beta * h)[:, None] * diff
        logdet = (z.shape[1] - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h ** 2)  # Eq. 2.9
        return y, logdet

    def inverse(self, y):  # (B, D) -> (B, D)
        """Eq. 2.11: y - z0 = (1 + β / (α + r)) (z - z0), a positive multiple, so ρ = ||y - z0|| = r (1 + β /
        (α + r)). Multiplied out: r² + (α + β - ρ) r - αρ = 0, whose one root r >= 0 is taken in the form
        that avoids cancellation; then z = z0 + (y - z0) / (1 + β / (α + r))."""
        alpha, beta = self.alpha_beta()
        diff = y - self.z0  # (B, D)
        rho = diff.norm(dim=1)  # (B,)
        B = alpha + beta - rho
        root = torch.sqrt(B ** 2 + 4 * alpha * rho)
        r = torch.where(B >= 0, 2 * alpha * rho / (B + root), (root - B) / 2)
        return self.z0 + diff / (1 + beta / (alpha + r))[:, None]


# --- The method ---


class NormalizingFlow(nn.Module):
    """q_K: z0 ~ q0 = N(0, I), z_k = f_k(z_{k-1}), log q_K(z_K) = log q0(z0) - Σ_k log|det ∂z_k/∂z_{k-1}|
    (README Eq. 1.4). Sampling and the ELBO use only the forward direction."""

    def __init__(self, flow="planar", layers=32, dim=2):
        super().__init__()
        layer = PlanarLayer if flow == "planar" else RadialLayer
        self.layers = nn.ModuleList(layer(dim) for _ in range(layers))
        self.dim = dim

    def forward(self, z):  # z0 (B, D) -> z_K (B, D), Σ log|det| (B,)
        logdet = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, ld = layer(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, z):  # z_K (B, D) -> z0 (B, D), layer by layer from the last
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x):  # (B, D) -> (B,)
        """log q_K(x): invert to z0, then replay the forward pass for the log-determinants (Eq. 1.4)."""
        z0 = self.inverse(x)
        _, logdet = self.forward(z0)
        return standard_normal_log_prob(z0) - logdet

    def sample(self, n):  # -> z_K (n, D), log q_K(z_K) (n,)
        param = next(self.parameters())
        z0 = torch.randn(n, self.dim, device=param.device, dtype=param.dtype)
        z, logdet = self(z0)
        return z, standard_normal_log_prob(z0) - logdet

    def loss(self, energy_name, n, beta=1.0):
        """The annealed free energy E[log q_K(z_K) + β_t U(z_K)] (Eq. 2.14); at β_t = 1 it is -ELBO."""
        z, log_q = self.sample(n)
        return (log_q + beta * energy(energy_name, z)).mean()


# --- Training ---


@torch.no_grad()
def estimate_elbo(model, energy_name, n, chunk=20000):
    """ELBO = E[-U(z_K) - log q_K(z_K)] (Eq. 2.13) by Monte Carlo, and its standard error."""
    terms = []
    for i in range(0, n, chunk):
        z, log_q = model.sample(min(chunk, n - i))
        terms.append((-energy(energy_name, z) - log_q).double())
    terms = torch.cat(terms)
    return terms.mean().item(), terms.std().item() / math.sqrt(n)


@torch.no_grad()
def density_on_grid(model, lim, n):
    """q_K at the centres of an n x n grid on [-lim, lim]^2, through the inverse (Eq. 1.3), in float64."""
    flow = copy.deepcopy(model).double().cpu()
    z, area = grid_points(lim, n)
    return torch.cat([flow.log_prob(part).exp() for part in z.split(40000)]).view(n, n), area


def train(cfg):
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ENERGIES if cfg.energy == "all" else (cfg.energy,)
    models = {e: NormalizingFlow(cfg.flow, cfg.layers).to(device) for e in names}
    optimizers = {e: torch.optim.Adam(models[e].parameters(), lr=cfg.lr) for e in names}
    steps = dict.fromkeys(names, 0)  # one flow, one optimizer and one step count per energy
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        saved = ckpt["config"]
        if (saved["flow"], saved["layers"], saved["energy"]) != (cfg.flow, cfg.layers, cfg.energy):
            raise SystemExit(f"error: {out / 'ckpt.pt'} holds --flow {saved['flow']} --layers {saved['layers']} "
                             f"--energy {saved['energy']}; pass the same flags to resume or sample from it")
        for e in names:
            models[e].load_state_dict(ckpt["model"][e])
            optimizers[e].load_state_dict(ckpt["optimizer"][e])
        steps = dict(ckpt["step"])

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {e: m.state_dict() for e, m in models.items()},
                                          "optimizer": {e: o.state_dict() for e, o in optimizers.items()},
                                          "config": asdict(cfg), "step": dict(steps)})

    t0 = time.time()
    try:
        for e in names:
            model, optimizer = models[e], optimizers[e]
            bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=steps[e], desc=f"{cfg.flow} {e}")
            while steps[e] < cfg.steps and not cfg.sample_only:
                # 1. the annealing weight of the energy (Eq. 2.14)
                beta = min(1.0, 0.01 + steps[e] / cfg.anneal_steps)
                # 2. push a batch z0 ~ q0 through the flow: Monte Carlo free energy (= -ELBO once beta = 1)
                loss = model.loss(e, cfg.batch_size, beta)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: loss is {loss.item()} at step {steps[e]} of {e}; "
                                     f"the last good checkpoint is {out / 'ckpt.pt'}")
                # 3. one gradient step on the raw parameters (the constraints hold for any value of them)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps[e] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", beta=f"{beta:.2f}", refresh=False)
                if steps[e] % cfg.log_every == 0 or steps[e] == cfg.steps:
                    elbo, se = estimate_elbo(model, e, 10000)
                    bar.write(f"{e} step {steps[e]}: ELBO {elbo:.3f} +- {se:.3f} (beta {beta:.2f})")
                    checkpoint()
            bar.close()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at steps {steps}; checkpoint saved to {out / 'ckpt.pt'}")
    checkpoint()

    # evaluation: ELBO by Monte Carlo, log Z by quadrature, their gap KL(q_K || p) (Eq. 2.13), and the
    # mass of q_K on a grid through the inverse (about 1 if inverse and log-determinants are right)
    results, rows, points, labels = {}, [], [], []
    for e in names:
        model = models[e].eval()
        elbo, se = estimate_elbo(model, e, cfg.eval_samples)
        log_z = log_partition(e)
        q_big, area = density_on_grid(model, 8.0, 320)
        mass = (q_big.sum() * area).item()
        results[e] = {"elbo": elbo, "elbo_se": se, "log_z": log_z, "kl": log_z - elbo, "q_mass": mass}
        print(f"{e}: ELBO {elbo:.4f} +- {se:.4f}, log Z {log_z:.4f} (quadrature), KL(q_K || p) = log Z - ELBO "
              f"= {log_z - elbo:.4f} +- {se:.4f} nats; mass of q_K on [-8, 8]^2 via the inverse {mass:.4f}")
        p, _ = grid_points(4.0, cfg.grid)
        target = torch.exp(-energy(e, p) - log_z).view(cfg.grid, cfg.grid)
        q, _ = density_on_grid(model, 4.0, cfg.grid)
        rows.append((target, q, f"{e}: exp(-U) / Z", f"{cfg.flow}, K = {cfg.layers}: KL {log_z - elbo:.3f} nats"))
        with torch.no_grad():
            points.append(model.sample(cfg.num_samples)[0].float().cpu())
        labels.append(torch.full((cfg.num_samples,), ENERGIES.index(e)))
    draw_densities(out / "samples.png", rows)
    np.savez_compressed(out / "samples.npz", points=torch.cat(points).numpy(),
                        labels=torch.cat(labels).numpy())  # labels: index of the energy in U1..U4
    print(f"{time.time() - t0:.0f} s; wrote {out / 'samples.png'}, {out / 'samples.npz'} and {out / 'ckpt.pt'}")
    return {**results, "step": dict(steps)}


# --- Drawing ---


VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)


def colorize(values):  # (H, W) in [0, 1] -> (H, W, 3) uint8, along five anchors of the viridis map
    v = np.clip(values, 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(v.astype(int), len(VIRIDIS) - 2)
    t = (v - i)[..., None]
    return (VIRIDIS[i] * (1 - t) + VIRIDIS[i + 1] * t).round().astype(np.uint8)


def draw_densities(path, rows, gap=8, label=18):
    """One row per energy: the target density and q_K on [-4, 4]^2, on the same colour scale."""
    size = rows[0][0].shape[0]
    figure = Image.new("RGB", (2 * size + 3 * gap, len(rows) * (size + label + gap) + gap), "white")
    draw = ImageDraw.Draw(figure)
    for k, (target, q, left, right) in enumerate(rows):
        top = target.max().item()
        y = gap + k * (size + label + gap)
        for j, (density, title) in enumerate(((target, left), (q, right))):
            figure.paste(Image.fromarray(colorize((density / top).numpy())), (gap + j * (size + gap), y + label))
            draw.text((gap + j * (size + gap), y + 3), title, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


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
