"""
Variational autoencoder (VAE): a latent-variable model of MNIST, trained on a lower bound on log p(x).

Papers: Kingma and Welling, "Auto-Encoding Variational Bayes", 2013, arXiv 1312.6114; Rezende, Mohamed
and Wierstra, "Stochastic Backpropagation and Approximate Inference in Deep Generative Models", 2014,
arXiv 1401.4082. Evaluation: Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders",
2016, arXiv 1509.00519.

The idea: a latent-variable model p(x) = ∫ p(x|z) p(z) dz with p(z) = N(0, I) and a decoder network
giving a Bernoulli probability per pixel. The integral has no closed form, so an encoder network
proposes q(z|x) = N(mu, diag(exp(logvar))) and both networks maximize the ELBO, a lower bound on
log p(x). Drawing z = mu + exp(logvar / 2) * eps makes the bound differentiable in the encoder (the
reparameterization trick), and its KL term has a closed form. With --binarize (pixels re-drawn as
x ~ Bernoulli(grey level) every batch: dynamically binarized MNIST, the literature's setting) p(x|z) is
a true likelihood, and --eval-nll estimates the test NLL in nats with the importance-weighted bound
(k = 5000), the number Burda et al. report (Table 1: 86.76 nats for a one-layer VAE with two hidden
layers of 200 tanh units and 50 latents, where this script uses ReLU). On grey-level pixels the
Bernoulli cross-entropy is a reconstruction loss only, not a likelihood.

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x)                  (README Eq. 4.3)
    z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)                                      (README Eq. 4.5)
    KL(q(z|x) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)           (README Eq. 4.9)
    L_k(x) = E log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)  ->  log p(x) as k -> inf     (README Eq. 4.12)

Run:   python 01_autoencoders/vae.py      (defaults sized for one GPU; add --binarize --eval-nll for nats.
       Designed to reach a test NLL <= 88 nats when trained to convergence; not measured on a GPU.)
CPU recipe: python 01_autoencoders/vae.py --steps 80000 --hidden 200 --binarize --eval-nll
Measured on this 2-core CPU: 17 min 7 s (wall, whole command: 576 s training, 447 s importance-weighted eval), test ELBO -96.77 nats, test NLL 92.56 nats (k = 5000).
Writes out/vae/: ckpt.pt, samples.png, samples.npz, reconstructions.png, interpolation.png. samples.npz
holds decoder means (the Bernoulli probabilities sigmoid(logits), as uint8 0..255), not binary draws.
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
    amp: bool = False  # bf16 autocast on CUDA (training only; the evaluations run in float32)
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/vae"  # checkpoint, samples and grids go here
    steps: int = 500000  # optimizer steps (about 1000 epochs at batch 128)
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam learning rate at the start, decayed to 0 on a cosine
    hidden: int = 512  # width of the two hidden layers of encoder and decoder
    latent_dim: int = 50  # size of z (Burda et al. use 50)
    binarize: bool = False  # train on x ~ Bernoulli(grey level) re-drawn every batch; the test set is binarized once, seed 0
    eval_nll: bool = False  # after training, estimate the test NLL in nats with the importance-weighted bound (needs --binarize)
    iw_k: int = 5000  # importance samples per test image for --eval-nll (Burda et al. use 5000)
    num_samples: int = 1000  # images decoded from z ~ N(0, I), for samples.npz
    log_every: int = 5000  # steps between test evaluations and checkpoints
    sample_only: bool = False  # skip training; evaluate and sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.eval_nll and not self.binarize:
            raise ValueError("--eval-nll needs --binarize: on grey-level pixels the Bernoulli cross-entropy "
                             "is not a normalized likelihood, so there is no NLL to estimate")
        for name in ("hidden", "latent_dim", "iw_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# --- Model ---


class MLP(nn.Sequential):
    """in -> hidden -> hidden -> out, ReLU between layers."""

    def __init__(self, d_in, hidden, d_out):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


# --- The method ---


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, summed over z (README Eq. 4.9). (..., D) -> (...)"""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


def gaussian_log_prob(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension. (..., D) -> (...)"""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).sum(-1)


def bernoulli_log_likelihood(x, logits):
    """sum_i x_i log sigmoid(l_i) + (1 - x_i) log sigmoid(-l_i) (README Eq. 4.10): log p(x|z) for binary x,
    only a cross-entropy for grey-level x. x (B, 784), logits (..., B, 784) -> (..., B)"""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def reparameterize(mu, logvar, eps=None):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (README Eq. 4.5): a draw of q(z|x) that is a
    differentiable function of mu and logvar. eps may carry a leading sample dimension, (k, B, D)."""
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps


def elbo_estimate(log_likelihood, mu, logvar, eps=None):
    """Unbiased estimate of the ELBO of each example (README Eq. 4.3): log p(x|z) averaged over the draws
    z = mu + sigma * eps, minus the KL in closed form. log_likelihood maps z (k, B, D) to log p(x|z) (k, B),
    for any decoder; eps (k, B, D) defaults to one draw of N(0, I). mu, logvar (B, D) -> (B,)"""
    eps = torch.randn(1, *mu.shape, device=mu.device, dtype=mu.dtype) if eps is None else eps
    z = reparameterize(mu, logvar, eps)  # (k, B, D)
    return log_likelihood(z).mean(0) - gaussian_kl(mu, logvar)


def iw_estimate(log_likelihood, mu, logvar, k):
    """Unbiased estimate of the importance-weighted bound L_k of each example (README Eq. 4.12):
    log (1/k) sum_i w_i with w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x). k = 1 is the ELBO with the KL
    sampled instead of computed. Same log_likelihood as elbo_estimate. mu, logvar (B, D) -> float64 (B,)"""
    z = reparameterize(mu, logvar, torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype))  # (k, B, D)
    zeros = torch.zeros_like(mu)
    log_w = log_likelihood(z) + gaussian_log_prob(z, zeros, zeros) - gaussian_log_prob(z, mu, logvar)  # (k, B)
    return torch.logsumexp(log_w.double(), dim=0) - math.log(k)  # log-mean-exp, in float64


class VAE(nn.Module):
    def __init__(self, hidden=512, latent_dim=50):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = MLP(784, hidden, 2 * latent_dim)  # x -> (mu, logvar) of q(z|x)
        self.decoder = MLP(latent_dim, hidden, 784)  # z -> logits of p(x|z), one Bernoulli per pixel

    def encode(self, x):  # (B, 1, 28, 28) -> mu, logvar, each (B, latent_dim)
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):  # (..., latent_dim) -> logits (..., 784)
        return self.decoder(z)

    def log_likelihood(self, x, z):
        """log p(x|z) (Eq. 4.10): x (B, 1, 28, 28), z (k, B, latent_dim) -> (k, B)"""
        return bernoulli_log_likelihood(x.flatten(1), self.decode(z))

    def elbo(self, x):
        """ELBO of each image (Eq. 4.3), estimated with one z per image. (B, 1, 28, 28) -> (B,)"""
        mu, logvar = self.encode(x)
        return elbo_estimate(lambda z: self.log_likelihood(x, z), mu, logvar)

    def iw_bound(self, x, k):
        """Importance-weighted bound L_k of each image (Eq. 4.12), k draws per image. (B, 1, 28, 28) -> (B,)"""
        mu, logvar = self.encode(x)
        return iw_estimate(lambda z: self.log_likelihood(x, z), mu, logvar, k)

    def loss(self, x):
        """Negative ELBO averaged over the batch: what training minimizes."""
        return -self.elbo(x).mean()

    @torch.no_grad()
    def sample(self, n):
        """Decoder means at z ~ p(z) = N(0, I): each pixel's Bernoulli probability. -> (n, 1, 28, 28)"""
        z = torch.randn(n, self.latent_dim, device=self.decoder[0].weight.device)
        return torch.sigmoid(self.decode(z)).view(n, 1, 28, 28)


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=1000):
    """Test negative ELBO per image (Eq. 4.3, one z per image) and the KL part of it."""
    neg_elbo = kl = 0.0
    for i in range(0, len(x_test), batch_size):
        x = x_test[i:i + batch_size]
        neg_elbo -= model.elbo(x).sum().item()
        kl += gaussian_kl(*model.encode(x)).sum().item()
    return neg_elbo / len(x_test), kl / len(x_test)


@torch.no_grad()
def estimate_nll(model, x_test, k, rows=10000):
    """Test NLL in nats, estimated by -L_k (Eq. 4.12) averaged over x_test. The encoder runs once per
    image; the decoder sees k x chunk rows at a time, chunk = rows // k images (at least one)."""
    chunk = max(1, rows // k)
    total = 0.0
    for i in tqdm(range(0, len(x_test), chunk), desc=f"L_k, k={k}", leave=False):
        total -= model.iw_bound(x_test[i:i + chunk], k).sum().item()
    return total / len(x_test)


def describe(neg_elbo, kl, binarize):
    if binarize:  # binary pixels: log p(x|z) is a log-probability and -ELBO an upper bound on the NLL
        return f"test ELBO {-neg_elbo:.2f} nats (NLL <= {neg_elbo:.2f}), KL {kl:.2f}"
    return (f"test loss {neg_elbo:.2f} = reconstruction cross-entropy {neg_elbo - kl:.2f} + KL {kl:.2f} "
            f"(grey-level pixels: a loss, not an NLL)")


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].float().div(255).unsqueeze(1)  # (N, 1, 28, 28) grey levels
    x_test = load_mnist(cfg.data_dir, train=False)[0].float().div(255).unsqueeze(1)
    if cfg.binarize:  # binarized once with a fixed seed, so that every run is scored on the same bits
        x_test = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(0))
    x_train, x_test = x_train.to(device), x_test.to(device)

    model = VAE(cfg.hidden, cfg.latent_dim).to(device)
    with torch.no_grad():  # start the decoder at the mean digit, as Burda et al.'s code does: bias = logit(mean pixel)
        model.decoder[-1].bias.copy_(torch.logit(x_train.mean(0).flatten().clamp(1e-3, 1 - 1e-3)))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise SystemExit(f"error: {out / 'ckpt.pt'} holds a model of another size; pass the --hidden and "
                             f"--latent-dim it was trained with ({ckpt['config']['hidden']}, {ckpt['config']['latent_dim']})")
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="vae")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits; with --binarize, fresh binary pixels x ~ Bernoulli(grey level)
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            if cfg.binarize:
                x = torch.bernoulli(x)
            # 2. the learning rate follows a cosine from lr down to 0
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            # 3. encode, draw z = mu + sigma * eps, decode: negative ELBO = cross-entropy + KL (Eq. 4.3)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = model.loss(x)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 4. one gradient step on encoder and decoder together; the gradient reaches mu, logvar through z
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.write(f"step {step}: {describe(*evaluate(model, x_test), cfg.binarize)}")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    train_time = time.time() - t0

    neg_elbo, kl = evaluate(model, x_test)
    print(f"{describe(neg_elbo, kl, cfg.binarize)} after {step} steps, {train_time:.0f} s")
    results = {"test_loss": neg_elbo, "test_kl": kl, "step": step, "train_time_s": train_time}
    if cfg.eval_nll:
        t1 = time.time()
        nll = estimate_nll(model, x_test, cfg.iw_k)
        results.update(test_nll=nll, nll_time_s=time.time() - t1)
        print(f"test NLL {nll:.2f} nats (importance-weighted bound, k={cfg.iw_k}, {len(x_test)} binarized test "
              f"images), {results['nll_time_s']:.0f} s; Burda et al.'s one-layer VAE, also k=5000: 86.76")
    checkpoint()

    with torch.no_grad():
        # reconstructions: odd rows are test digits, even rows the decoder means at z = mu
        x = x_test[:32]
        x_hat = torch.sigmoid(model.decode(model.encode(x)[0])).view(32, 1, 28, 28)
        pairs = torch.stack([x.view(4, 8, 1, 28, 28), x_hat.view(4, 8, 1, 28, 28)], 1).view(64, 1, 28, 28)
        save_grid(pairs, out / "reconstructions.png", nrow=8)
        # interpolation: each row walks in a straight line from mu(x_a) to mu(x_b) for two test digits
        mu_a, mu_b = model.encode(x_test[32:40])[0], model.encode(x_test[40:48])[0]  # (8, D) each
        t = torch.linspace(0, 1, 10, device=device).view(1, 10, 1)
        z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (8, 10, D)
        save_grid(torch.sigmoid(model.decode(z)).view(80, 1, 28, 28), out / "interpolation.png", nrow=10)
    samples = model.sample(cfg.num_samples)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} (decoder means as uint8), "
          f"{out / 'reconstructions.png'} and {out / 'interpolation.png'}")
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
    cfg = parse_config(Config, argv)
    return train(cfg)


if __name__ == "__main__":
    main()
