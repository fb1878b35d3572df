"""
Gaussian mixture: the first generative model of the course, fitted by maximum likelihood.

Paper: Dempster, Laird and Rubin, "Maximum Likelihood from Incomplete Data via the EM Algorithm",
JRSS B 1977 (no arXiv id), for the model and its classical fit; here it is fitted the way every
later model in the course is: gradient descent (Adam; Kingma and Ba 2014, arXiv:1412.6980) on the
average negative log-likelihood. Toy data as in FFJORD (Grathwohl et al. 2018, arXiv:1810.01367).

The idea: a density p_theta(x) with parameters theta is a generative model as soon as we can
evaluate it (to train and to score) and sample from it. Maximizing the average log-likelihood of
the training points is minimizing the forward KL from the data distribution to the model
(README Eq. 6.2). A mixture of K Gaussians is the simplest density that can have several modes:

    p(x) = sum_k pi_k N(x; mu_k, L_k L_k^T),  pi = softmax(logits)      (README Eq. 6.3)
    log p(x) = m + log sum_k exp(a_k - m),  a_k = log pi_k + log N_k,  m = max_k a_k   (Eq. 6.5)
    L_k lower triangular with a positive (exponentiated) diagonal                   (Eq. 6.6)
    sample: k ~ Categorical(pi), then x = mu_k + L_k eps, eps ~ N(0, I)             (Eq. 6.7)

Run:   python 00_prerequisites/gaussian_mixture.py                 (8 Gaussians, K = 16, seconds)
CPU recipe: python 00_prerequisites/gaussian_mixture.py
Measured on a 2-core CPU: 6 s (2.5 s training); held-out log-likelihood -2.860 nats per point (train -2.805, true density -2.829).
Other data: --data moons | 8gaussians | swissroll | checkerboard | rings; --fit em fits the same
model by expectation-maximization instead (one closed-form EM iteration per step; em_step).
Writes out/gaussian_mixture/: ckpt.pt, samples.npz (`points`, float32 N x 2), density.png.
"""

import argparse
import dataclasses
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
from PIL import Image, ImageDraw
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    out_dir: str = "out/gaussian_mixture"  # checkpoint, samples and the density figure go here
    data: str = "8gaussians"  # toy data: moons | 8gaussians | swissroll | checkerboard | rings
    n_train: int = 2000  # training points (a fixed set, so the gap to held-out can show overfitting)
    n_test: int = 20000  # held-out points, drawn fresh from the same distribution
    components: int = 16  # K, the number of Gaussians in the mixture (8 for 8 modes often gets stuck)
    steps: int = 1000  # optimizer steps
    batch_size: int = 2000  # points per step (n_train or more: full-batch gradient descent)
    lr: float = 0.02  # Adam learning rate
    fit: str = "adam"  # adam: gradient descent on Eq. 6.1 | em: expectation-maximization (one full-data EM iteration per step)
    num_samples: int = 2000  # points sampled from the fitted mixture, for samples.npz
    log_every: int = 500  # steps between held-out evaluations and checkpoints

    def __post_init__(self):
        if self.fit not in ("adam", "em"):
            raise ValueError(f"--fit must be adam or em, got {self.fit!r}")
        if self.data not in TOY_2D_NAMES:
            raise ValueError(f"--data must be one of {', '.join(TOY_2D_NAMES)}, got {self.data!r}")
        for name in ("n_train", "n_test", "components"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


TOY_2D_NAMES = ("moons", "8gaussians", "swissroll", "checkerboard", "rings")


# --- Model ---


def logsumexp(a, dim):
    """log sum_k exp(a_k) without overflow or underflow: subtract the largest term first (Eq. 6.5).
    Then the largest exp is exp(0) = 1, so the sum is in [1, K] and its log is finite."""
    m = a.max(dim, keepdim=True).values  # (..., 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: return -inf, not nan
    return (m + (a - m).exp().sum(dim, keepdim=True).log()).squeeze(dim)


# --- The method ---


class GaussianMixture(nn.Module):
    """p(x) = sum_k pi_k N(x; mu_k, Sigma_k) in D dimensions (README Eq. 6.3).

    Every parameter is unconstrained, so plain gradient descent can move it anywhere:
    logits -> pi = softmax(logits) (positive, sums to 1);
    chol_raw -> L = strictly-lower part of chol_raw + diag(exp(diagonal of chol_raw)), a Cholesky
    factor with a positive diagonal, so Sigma = L L^T is always symmetric positive definite (Eq. 6.6).
    """

    def __init__(self, components=16, dim=2):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))  # (K,)
        self.means = nn.Parameter(torch.randn(components, dim))  # (K, D)
        self.chol_raw = nn.Parameter(torch.zeros(components, dim, dim))  # (K, D, D); L = I at the start

    @torch.no_grad()
    def init_from_data(self, x):
        """Means at K distinct random data points, every covariance the data's variance times I / K:
        a neutral start that already covers the data (Eq. 6.6: log of the diagonal of L)."""
        k, d = self.means.shape
        self.means.copy_(x[torch.randperm(len(x), device=x.device)[:k]])
        scale = x.var(0).mean().sqrt() / math.sqrt(k)
        self.chol_raw.zero_()
        self.chol_raw.diagonal(dim1=-2, dim2=-1).fill_(scale.log())
        self.logits.zero_()

    def chol(self):  # (K, D, D): lower triangular, positive diagonal (Eq. 6.6)
        return self.chol_raw.tril(-1) + torch.diag_embed(self.chol_raw.diagonal(dim1=-2, dim2=-1).exp())

    def log_weights(self):  # (K,) log pi_k = logits_k - log sum_j exp(logits_j)
        return self.logits - logsumexp(self.logits, 0)

    def component_log_prob(self, x):
        """log N(x; mu_k, L_k L_k^T) for every point and component (Eq. 6.4), (B, D) -> (B, K).
        Solving L z = x - mu gives |z|^2 = (x - mu)^T Sigma^-1 (x - mu) without forming Sigma^-1,
        and log det Sigma = 2 sum_i log L_ii = 2 sum_i chol_raw_ii: no determinant is ever computed."""
        L = self.chol()
        d = x.shape[1]
        diff = x[None, :, :] - self.means[:, None, :]  # (K, B, D)
        z = torch.linalg.solve_triangular(L, diff.transpose(1, 2), upper=False)  # (K, D, B)
        maha = z.pow(2).sum(1)  # (K, B) squared Mahalanobis distances
        half_logdet = self.chol_raw.diagonal(dim1=-2, dim2=-1).sum(-1)  # (K,) = log det L = 0.5 log det Sigma
        return (-0.5 * maha - half_logdet[:, None] - 0.5 * d * math.log(2 * math.pi)).T  # (B, K)

    def log_prob(self, x):
        """log p(x) = logsumexp_k (log pi_k + log N(x; mu_k, Sigma_k)), (B, D) -> (B,) (Eq. 6.5)."""
        return logsumexp(self.log_weights() + self.component_log_prob(x), 1)

    def loss(self, x):
        """The average negative log-likelihood in nats per point (Eq. 6.1, the objective)."""
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n, generator=None):
        """Ancestral sampling (Eq. 6.7): first which component, then where in it."""
        device = self.means.device
        k = torch.multinomial(self.log_weights().exp().cpu(), n, replacement=True, generator=generator).to(device)  # (n,)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype).to(device)  # (n, D)
        return self.means[k] + (self.chol()[k] @ eps[:, :, None]).squeeze(-1)  # (n, D)


@torch.no_grad()
def em_step(model, x, jitter=1e-6):
    """One EM iteration on all of x (Dempster et al. 1977; Bishop 2006, section 9.2.2), the classical
    alternative to gradient descent for the same model. Never lowers the training log-likelihood.
    E-step: responsibilities r_ik = p(k | x_i), the softmax over k of a_ik (the gradient of Eq. 6.5).
    M-step: each component is a weighted maximum-likelihood Gaussian fit, in closed form."""
    a = model.log_weights() + model.component_log_prob(x)  # (B, K)
    r = (a - logsumexp(a, 1)[:, None]).exp()  # (B, K), rows sum to 1
    nk = r.sum(0) + 1e-10  # (K,) effective number of points per component
    mu = (r.T @ x) / nk[:, None]  # (K, D)
    diff = x[None, :, :] - mu[:, None, :]  # (K, B, D)
    cov = torch.einsum("bk,kbi,kbj->kij", r, diff, diff) / nk[:, None, None]  # (K, D, D)
    L = torch.linalg.cholesky(cov + jitter * torch.eye(x.shape[1], dtype=x.dtype, device=x.device))
    model.logits.copy_(nk.log())  # softmax(log nk) = nk / N
    model.means.copy_(mu)
    model.chol_raw.copy_(L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log()))  # Eq. 6.6 inverted


# --- Training ---


@torch.no_grad()
def average_log_likelihood(model, x, batch_size=10000):
    """Average log p(x) over x in nats per point (higher is better)."""
    return sum(model.log_prob(x[i:i + batch_size]).sum().item() for i in range(0, len(x), batch_size)) / len(x)


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # training and held-out sets: independent draws from the same toy distribution
    g = torch.Generator().manual_seed(cfg.seed)
    x_train = toy_2d(cfg.data, cfg.n_train, g).to(device)  # (N, 2)
    x_test = toy_2d(cfg.data, cfg.n_test, g).to(device)  # (M, 2)

    model = GaussianMixture(cfg.components, 2).to(device)
    model.init_from_data(x_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=cfg.steps, desc="gaussian_mixture")
    try:
        while step < cfg.steps:
            # 1. a batch of training points (all of them when batch_size >= n_train)
            if cfg.batch_size >= cfg.n_train:
                x = x_train
            else:
                x = x_train[torch.randint(cfg.n_train, (cfg.batch_size,), device=device)]
            # 2. the average negative log-likelihood, nats per point (Eq. 6.1)
            loss = model.loss(x)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one Adam step on logits, means and Cholesky factors together (or one EM iteration)
            if cfg.fit == "em":
                em_step(model, x_train)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(nll=f"{loss.item():.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"step {step}: train {average_log_likelihood(model, x_train):.4f}, "
                          f"held-out {average_log_likelihood(model, x_test):.4f} nats per point")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    checkpoint()

    # held-out versus train log-likelihood (Eq. 6.8), and the true density's where it is known
    result = {"train_ll": average_log_likelihood(model, x_train), "test_ll": average_log_likelihood(model, x_test),
              "step": step}
    line = f"average log-likelihood: train {result['train_ll']:.4f}, held-out {result['test_ll']:.4f} nats per point"
    if cfg.data in ("8gaussians", "checkerboard"):
        result["true_test_ll"] = toy_2d_log_prob(cfg.data, x_test.cpu()).mean().item()
        line += f"; true density on the held-out set {result['true_test_ll']:.4f}"
    print(line + f" ({cfg.data}, K = {cfg.components}, {cfg.fit}, {step} steps, {time.time() - t0:.1f} s)")

    samples = model.sample(cfg.num_samples).cpu()
    np.savez_compressed(out / "samples.npz", points=samples.numpy().astype(np.float32))
    draw_density(model, x_train.cpu(), samples, out / "density.png")
    print(f"wrote {out / 'ckpt.pt'}, {out / 'samples.npz'} and {out / 'density.png'}")
    return result


# --- Figure ---


def draw_density(model, data, samples, path, size=256, extent=4.0):
    """Three panels drawn with pillow: training data, the learned density exp(log p) as a heat map,
    and samples from the mixture, each over the square [-extent, extent]^2."""
    def pixels(points):  # (N, 2) -> integer pixel columns and rows, y axis pointing up
        ij = ((points + extent) / (2 * extent) * size).floor().long()
        keep = ((ij >= 0) & (ij < size)).all(1)
        return ij[keep, 0].numpy(), (size - 1 - ij[keep, 1]).numpy()

    def scatter(points):
        canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        cols, rows = pixels(points)
        canvas[rows, cols] = (40, 60, 140)
        return canvas

    centres = (torch.arange(size) + 0.5) / size * 2 * extent - extent
    xx, yy = torch.meshgrid(centres, centres.flip(0), indexing="xy")  # row 0 at the top: largest y
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(model.means.device)
    with torch.no_grad():
        density = model.log_prob(grid).exp().view(size, size).cpu()
    t = (density / density.max()).sqrt().numpy()[..., None]  # sqrt so the low-density tails show
    dark, light = np.array([20, 20, 60.0]), np.array([255, 230, 80.0])
    heat = ((1 - t) * dark + t * light).round().astype(np.uint8)

    gap, label = 8, 18
    figure = Image.new("RGB", (3 * size + 4 * gap, size + gap + label), "white")
    draw = ImageDraw.Draw(figure)
    for i, (title, panel) in enumerate([("training data", scatter(data)), ("learned density", heat),
                                        ("samples from the mixture", scatter(samples))]):
        figure.paste(Image.fromarray(panel), (gap + i * (size + gap), label))
        draw.text((gap + i * (size + gap), 3), title, fill="black")
    figure.save(path)


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


# --- Main ---


def main(argv=None):
    cfg = parse_config(Config, argv)
    return train(cfg)


if __name__ == "__main__":
    main()
