"""
Hierarchical VAE: two stochastic layers z2 -> z1 -> x, with Ladder-VAE top-down inference.

Papers: Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, arXiv 1509.00519
(the two-layer model, the active-units criterion, the k = 5000 test NLL). Sønderby, Raiko, Maaløe,
Sønderby and Winther, "Ladder Variational Autoencoders", NeurIPS 2016, arXiv 1602.02282 (top-down
inference, KL warm-up). Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling, "Improved
Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016, arXiv 1606.04934 (free bits).

The idea: stack two Gaussian latent layers. The generative path runs top-down, p(z2) p(z1|z2) p(x|z1),
so z2 can hold the coarse content (which digit, slant) and z1 the details it leaves open. Inference
runs top-down as well: a deterministic bottom-up pass reads x once; q(z2|x) comes from its top, and
q(z1|x,z2) multiplies the prior p(z1|z2) by a bottom-up Gaussian estimate (precision weighting). Given
the sample of z2, both posteriors and both priors are diagonal Gaussians, so both layers' KL terms are
closed-form (z2's exactly; z1's given one Monte Carlo draw of z2). Upper layers tend to switch off
(posterior collapse); KL warm-up and free bits keep them alive, and active units count the survivors.

    ELBO = E_q log p(x|z1) - KL(q(z2|x) || p(z2)) - E_q(z2|x) KL(q(z1|x,z2) || p(z1|z2))   (README Eq. 6.4)
    q(z1|x,z2): 1/s1^2 = 1/s_hat^2 + 1/s_p^2,  mu1 = s1^2 (mu_hat/s_hat^2 + mu_p/s_p^2)       (README Eq. 6.3)
    loss = -E_q log p(x|z1) + beta(t) sum_groups max(lambda, batch mean of KL_group)        (README Eq. 6.6, 6.7)
    log p(x) >= log 1/k sum_i p(x, z1_i, z2_i) / q(z1_i, z2_i | x)                          (README Eq. 6.9)

Run:   python 01_autoencoders/hvae.py --eval-nll             (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 01_autoencoders/hvae.py --steps 40000 --warmup 10000 --eval-nll
Measured on this 2-core CPU: 17 min 9 s (wall, whole command: 454 s training, 569 s IW evaluation); test -ELBO
93.26 nats, test NLL 87.83 nats (k = 5000); active units z1 100/100, z2 6/50 (z1 units with own KL > 0.01 nats: 16).
Writes out/hvae/: ckpt.pt, samples.png, samples.npz, layers.png (each row shares one z2).
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
    amp: bool = False  # bf16 autocast on CUDA
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/hvae"  # checkpoint, samples and grids go here
    steps: int = 100000  # optimizer steps
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam learning rate
    hidden: int = 200  # width of the tanh layers next to x; those between z1 and z2 have hidden // 2 (Burda et al.: 200)
    z1_dim: int = 100  # units of the lower stochastic layer z1 (Burda et al.: 100)
    z2_dim: int = 50  # units of the top stochastic layer z2 (Burda et al.: 50)
    warmup: int = 20000  # KL warm-up: beta rises linearly from 0 to 1 over this many steps (0: beta = 1 throughout), README Eq. 6.6
    free_bits: float = 0.0  # lambda in nats per latent unit: a unit's batch-mean KL below it is not penalized (0: off), README Eq. 6.7
    binarize: bool = True  # dynamically binarized MNIST (a fresh Bernoulli draw per batch; the test set once, fixed seed)
    eval_nll: bool = False  # after training, estimate the test NLL with the k-sample importance-weighted bound (README Eq. 6.9)
    iw_k: int = 5000  # importance samples per test image for --eval-nll (Burda et al.: 5000)
    num_samples: int = 1000  # images sampled from the model for samples.npz
    log_every: int = 5000  # steps between test evaluations and checkpoints
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        for name, low in [("hidden", 2), ("z1_dim", 1), ("z2_dim", 1), ("iw_k", 1), ("warmup", 0)]:
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if not self.free_bits >= 0:
            raise ValueError(f"--free-bits must be >= 0, got {self.free_bits}")


# --- Model ---


def mlp(d_in, hidden, d_out=None):
    """d_in -> hidden -> hidden with tanh (Burda et al.'s deterministic layers), then a linear map to d_out if given."""
    layers = [nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, *([nn.Linear(hidden, d_out)] if d_out else []))


def gaussian_log_prob(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """Eq. 6.5: KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) per unit, in nats (not summed)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1)


def precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p):
    """Eq. 6.3: the Gaussian proportional to N(mu_hat, s_hat^2) N(mu_p, s_p^2). Precisions add; the mean is the
    precision-weighted average, with weight sigmoid(logvar_p - logvar_hat) = s_hat^-2 / (s_hat^-2 + s_p^-2) on mu_hat."""
    w = torch.sigmoid(logvar_p - logvar_hat)
    return w * mu_hat + (1 - w) * mu_p, -torch.logaddexp(-logvar_hat, -logvar_p)


def log_bernoulli(x, logits):
    """log p(x | logits) of independent Bernoulli pixels, sum_d x_d l_d - log(1 + e^l_d): x (B, 784) against
    logits (..., B, 784) -> (..., B). Two reductions and one softplus: the k = 5000 evaluation spends its time here."""
    return torch.einsum("...bd,bd->...b", logits, x) - F.softplus(logits).sum(-1)


def kl_warmup(step, warmup):
    """Eq. 6.6: beta grows linearly from 0 at step 0 to 1 at step `warmup`, then stays at 1."""
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


def free_bits(kl, lam):
    """Eq. 6.7: kl (B, G) per image and group (here a group is one latent unit) -> sum_g max(lambda, mean_B kl_g).
    A group whose batch-mean KL is below lambda contributes a constant: its gradient is zero."""
    return kl.mean(0).clamp(min=lam).sum()


def active_units(means, threshold=0.01):
    """Eq. 6.8 (Burda et al.): unit u is active when Var_x(E_q(u|x)[u]) > threshold.
    means (N, D): the posterior mean of each unit for N inputs -> (number of active units, variances (D,))."""
    variances = means.var(0, unbiased=False)
    return int((variances > threshold).sum()), variances


# --- The method ---


class LadderVAE(nn.Module):
    """Generative path p(z2) p(z1|z2) p(x|z1) (Eq. 6.1); inference q(z2|x) q(z1|x,z2) with Ladder-VAE
    precision weighting (Eq. 6.2, 6.3). Sizes follow Burda et al.'s two-layer model: 784-200-200-100-100-50."""

    def __init__(self, hidden=200, z1_dim=100, z2_dim=50):
        super().__init__()
        h2 = hidden // 2
        self.z2_dim = z2_dim
        self.up1 = mlp(784, hidden)  # bottom-up: x -> d1
        self.up2 = mlp(hidden, h2)  # bottom-up: d1 -> d2
        self.q1_hat = nn.Linear(hidden, 2 * z1_dim)  # d1 -> (mu_hat, logvar_hat): the bottom-up estimate of z1
        self.q2 = nn.Linear(h2, 2 * z2_dim)  # d2 -> (mu2, logvar2) of q(z2|x)
        self.p1 = mlp(z2_dim, h2, 2 * z1_dim)  # top-down: z2 -> (mu_p, logvar_p) of p(z1|z2)
        self.px = mlp(z1_dim, hidden, 784)  # top-down: z1 -> Bernoulli logits of p(x|z1)

    def bottom_up(self, x):  # (B, ...) -> mu_hat, logvar_hat (B, z1_dim); mu2, logvar2 (B, z2_dim)
        d1 = self.up1(x.flatten(1))  # (B, hidden)
        mu_hat, logvar_hat = self.q1_hat(d1).float().chunk(2, -1)
        mu2, logvar2 = self.q2(self.up2(d1)).float().chunk(2, -1)
        return mu_hat, logvar_hat, mu2, logvar2

    def prior1(self, z2):  # (..., z2_dim) -> mu_p, logvar_p of p(z1|z2): (..., z1_dim) each
        return self.p1(z2).float().chunk(2, -1)

    def decode(self, z1):  # (..., z1_dim) -> Bernoulli logits (..., 784)
        return self.px(z1).float()

    def forward(self, x, n=None):
        """One ancestral pass through q: z2 ~ q(z2|x), then z1 ~ q(z1|x,z2), both reparameterized.
        n draws per image (leading dimension n) or, with n None, one. Returns every density parameter used."""
        mu_hat, logvar_hat, mu2, logvar2 = self.bottom_up(x)  # the bottom-up pass runs once per image
        eps2 = torch.randn(mu2.shape if n is None else (n, *mu2.shape), device=mu2.device)
        z2 = mu2 + torch.exp(0.5 * logvar2) * eps2  # (n, B, z2_dim) or (B, z2_dim)
        mu_p, logvar_p = self.prior1(z2)
        mu1, logvar1 = precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p)  # q(z1|x, z2), Eq. 6.3
        z1 = mu1 + torch.exp(0.5 * logvar1) * torch.randn_like(mu1)
        return dict(z2=z2, mu2=mu2, logvar2=logvar2, z1=z1, mu1=mu1, logvar1=logvar1, mu_p=mu_p, logvar_p=logvar_p,
                    logits=self.decode(z1))

    def terms(self, x):
        """Eq. 6.4 for each image, one draw: log p(x|z1) (B,), and the per-unit KLs of z1 (B, z1_dim) and z2 (B, z2_dim).
        KL(z2) is exact; KL(z1) is exact given the drawn z2 (a one-sample Monte Carlo estimate of E_q(z2|x))."""
        s = self(x)
        log_px = log_bernoulli(x.flatten(1).float(), s["logits"])
        kl2 = gaussian_kl(s["mu2"], s["logvar2"], torch.zeros_like(s["mu2"]), torch.zeros_like(s["logvar2"]))
        kl1 = gaussian_kl(s["mu1"], s["logvar1"], s["mu_p"], s["logvar_p"])
        return log_px, kl1, kl2

    def loss(self, x, beta=1.0, lam=0.0):
        """Negative ELBO per image, KL weighted by beta (Eq. 6.6), each unit's KL clamped below at lambda (Eq. 6.7).
        With beta = 1 and lambda = 0 this is exactly -ELBO averaged over the batch."""
        log_px, kl1, kl2 = self.terms(x)
        return -log_px.mean() + beta * (free_bits(kl1, lam) + free_bits(kl2, lam))

    def log_weights(self, x, n):
        """Eq. 6.9: log w = log p(x, z1, z2) - log q(z1, z2 | x) for n draws per image: x (B, ...) -> (n, B)."""
        s = self(x, n)
        log_p = (log_bernoulli(x.flatten(1).float(), s["logits"]) + gaussian_log_prob(s["z1"], s["mu_p"], s["logvar_p"])
                 - 0.5 * (math.log(2 * math.pi) + s["z2"].pow(2)).sum(-1))  # log p(x|z1) + log p(z1|z2) + log p(z2)
        log_q = gaussian_log_prob(s["z1"], s["mu1"], s["logvar1"]) + gaussian_log_prob(s["z2"], s["mu2"], s["logvar2"])
        return log_p - log_q

    @torch.no_grad()
    def iw_bound(self, x, k, rows=16384):
        """Eq. 6.9: log (1/k) sum_i w_i per image (B,), the k draws taken in chunks of about `rows` decoder rows."""
        n = max(1, rows // len(x))
        chunks = [torch.logsumexp(self.log_weights(x, min(n, k - i)), 0) for i in range(0, k, n)]
        return torch.logsumexp(torch.stack(chunks), 0) - math.log(k)

    @torch.no_grad()
    def posterior_means(self, x, n=16):
        """E_q[z1|x] (B, z1_dim) and E_q[z2|x] (B, z2_dim) for Eq. 6.8. E[z2|x] = mu2 exactly;
        E[z1|x] = E_q(z2|x)[mu1(x, z2)], averaged over n draws of z2."""
        s = self(x, n)
        return s["mu1"].mean(0), s["mu2"]

    @torch.no_grad()
    def sample(self, n, z2=None):
        """Ancestral sampling down the generative path (Eq. 6.1): z2 ~ N(0, I), z1 ~ p(z1|z2), then the pixel
        means of p(x|z1), (n, 1, 28, 28). Pass z2 (n, z2_dim) to fix the top layer."""
        device = next(self.parameters()).device
        z2 = torch.randn(n, self.z2_dim, device=device) if z2 is None else z2
        mu_p, logvar_p = self.prior1(z2)
        z1 = mu_p + torch.exp(0.5 * logvar_p) * torch.randn_like(mu_p)
        return torch.sigmoid(self.decode(z1)).view(-1, 1, 28, 28)


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=1000):
    """Test -ELBO per image (Eq. 6.4 with beta = 1, no free bits: the bound itself), its parts, and per layer the
    active units (Eq. 6.8) and the units whose own KL, averaged over the test set, exceeds 0.01 nats."""
    sums, unit_kl1, unit_kl2, means1, means2 = torch.zeros(3, dtype=torch.float64), 0, 0, [], []
    for i in range(0, len(x_test), batch_size):
        x = x_test[i:i + batch_size]
        log_px, kl1, kl2 = model.terms(x)
        sums += torch.stack([-log_px.sum(), kl1.sum(), kl2.sum()]).double().cpu()
        unit_kl1, unit_kl2 = unit_kl1 + kl1.sum(0), unit_kl2 + kl2.sum(0)
        mean1, mean2 = model.posterior_means(x)
        means1.append(mean1)
        means2.append(mean2)
    recon, kl1, kl2 = (sums / len(x_test)).tolist()
    return {"neg_elbo": recon + kl1 + kl2, "recon": recon, "kl_z1": kl1, "kl_z2": kl2,
            "active_z1": active_units(torch.cat(means1))[0], "active_z2": active_units(torch.cat(means2))[0],
            "kl_units_z1": int((unit_kl1 / len(x_test) > 0.01).sum()), "kl_units_z2": int((unit_kl2 / len(x_test) > 0.01).sum())}


@torch.no_grad()
def estimate_nll(model, x_test, k, batch_size=20):
    """Test NLL in nats: minus the k-sample importance-weighted bound (Eq. 6.9), averaged over the test set."""
    batches = range(0, len(x_test), batch_size)
    total = sum(-model.iw_bound(x_test[i:i + batch_size], k).sum().item() for i in tqdm(batches, desc=f"IW-NLL k={k}", leave=False))
    return total / len(x_test)


def report(m, model):
    d1, d2 = model.q1_hat.out_features // 2, model.z2_dim
    return (f"test -ELBO {m['neg_elbo']:.2f} nats (reconstruction {m['recon']:.2f}, KL z1 {m['kl_z1']:.2f}, KL z2 "
            f"{m['kl_z2']:.2f}); active units z1 {m['active_z1']}/{d1}, z2 {m['active_z2']}/{d2}; units with KL > 0.01 "
            f"nats z1 {m['kl_units_z1']}/{d1}, z2 {m['kl_units_z2']}/{d2}")


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].float().div(255).flatten(1)  # (60000, 784) grey levels in [0, 1]
    x_test = load_mnist(cfg.data_dir, train=False)[0].float().div(255).flatten(1)  # (10000, 784)
    if cfg.binarize:  # the test set is binarized once, with a fixed seed: every run is scored on the same digits
        x_test = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(1234))
    x_train, x_test = x_train.to(device), x_test.to(device)

    model = LadderVAE(cfg.hidden, cfg.z1_dim, cfg.z2_dim).to(device)
    with torch.no_grad():  # the decoder starts at the pixel marginals (Burda et al.), not at a grey mean image
        model.px[-1].bias.copy_(torch.logit(x_train.mean(0), eps=1e-3))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="hvae")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits, binarized afresh each time it is drawn
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            if cfg.binarize:
                x = torch.bernoulli(x)
            # 2. the KL weight of this step (Eq. 6.6)
            beta = kl_warmup(step, cfg.warmup)
            # 3. one pass up and down: reconstruction + beta * free-bits KL of both layers (Eq. 6.4, 6.7)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = model.loss(x, beta, cfg.free_bits)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 4. one gradient step on inference and generative networks together
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}", beta=f"{beta:.2f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                bar.write(f"step {step}: {report(evaluate(model, x_test), model)}, beta {beta:.2f}")
                model.train()
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    train_seconds = time.time() - t0

    model.eval()
    metrics = evaluate(model, x_test)
    print(f"{report(metrics, model)} after {step} steps, {train_seconds:.0f} s of training")
    result = {**metrics, "step": step, "train_seconds": train_seconds}
    if cfg.eval_nll:
        t1 = time.time()
        result["nll"] = estimate_nll(model, x_test, cfg.iw_k)
        result["nll_seconds"] = time.time() - t1
        print(f"test NLL {result['nll']:.2f} nats (importance-weighted bound, k = {cfg.iw_k}, {len(x_test)} test images, "
              f"{result['nll_seconds']:.0f} s)")
    checkpoint()

    samples = model.sample(cfg.num_samples)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    z2 = torch.randn(8, cfg.z2_dim, device=device).repeat_interleave(8, 0)  # each row: one z2, eight z1 ~ p(z1|z2)
    save_grid(model.sample(64, z2), out / "layers.png", nrow=8)
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} and {out / 'layers.png'}")
    return result


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
