"""
beta-VAE: a VAE whose KL term is weighted by beta, read as a rate-distortion trade-off.

Papers: Higgins, Matthey, Pal, Burgess, Glorot, Botvinick, Mohamed and Lerchner, "beta-VAE:
Learning Basic Visual Concepts with a Constrained Variational Framework", ICLR 2017 (no arXiv id).
Burgess, Higgins, Pal, Matthey, Watters, Desjardins and Lerchner, "Understanding disentangling in
beta-VAE", 2018, arXiv 1804.03599 (the capacity-annealed objective, --capacity-max).

The idea: the VAE loss (README section 4) is a distortion D = -E log p(x|z) plus a rate
R = KL(q(z|x) || N(0, I)), the nats the code spends on each image. Weighting the rate by beta is
the Lagrangian of "reconstruct as well as you can while spending at most C nats" (README Eq. 5.5):
beta > 1 squeezes the code, switches off latent dimensions and, the hope goes, aligns the ones
left with independent factors; beta < 1 buys sharper reconstructions with a code the prior fits badly.
Burgess et al. instead pin the rate to a target C that grows during training. Encoder: Gaussian
q(z|x) = N(mu, diag exp(logvar)); decoder: Bernoulli logits on grey-level MNIST, so the
reconstruction term is a binary cross-entropy (BCE) in nats, not a likelihood of the pixels.

    L_beta = BCE(x, decoder(z)) + beta * KL(q(z|x) || N(0, I)),  z = mu + exp(logvar / 2) * eps   (README Eq. 5.6)
    L_C    = BCE(x, decoder(z)) + gamma * | KL(q(z|x) || N(0, I)) - C(t) |                       (README Eq. 5.7)
    C(t)   = C_max * min(t / T, 1)                                                            (README Eq. 5.8)

Run:   python 01_autoencoders/beta_vae.py                     (defaults sized for one GPU; beta = 4)
       python 01_autoencoders/beta_vae.py --capacity-max 25 --gamma 1000   (Burgess et al.)
       python 01_autoencoders/beta_vae.py --latent-dim 2       (adds latent_space.png, manifold.png)
CPU recipe: python 01_autoencoders/beta_vae.py --steps 10000 --hidden 256
Measured on this 2-core CPU: 71 s (wall, whole command), test distortion (BCE) 112.29 nats and rate (KL)
8.03 nats per image (BCE + KL 120.32 nats); 6 of the 10 latent dimensions active (KL > 0.1 nat).
Writes out/beta_vae/: ckpt.pt, samples.png, samples.npz, traversal.png (+ latent_space.png, manifold.png in 2-D).
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
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/beta_vae"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam learning rate
    hidden: int = 512  # width of the two hidden layers of encoder and decoder
    latent_dim: int = 10  # size of z; 2 also draws latent_space.png and manifold.png
    beta: float = 4.0  # weight of the KL (rate) term, README Eq. 5.6; 1 is the plain VAE
    capacity_max: float = 0.0  # C_max in nats; > 0 switches to gamma * |KL - C| (README Eq. 5.7) and ignores beta
    gamma: float = 1000.0  # weight of |KL - C| in the capacity objective (Burgess et al. use 1000)
    capacity_steps: int = 15000  # steps over which C grows linearly from 0 to C_max, then stays (README Eq. 5.8)
    traversal_range: float = 3.0  # traversal.png sweeps each z_j over [-range, range]
    num_samples: int = 1000  # images decoded from z ~ N(0, I), for samples.npz
    log_every: int = 1000  # steps between test evaluations and checkpoints
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        for name, low in [("hidden", 1), ("latent_dim", 1), ("capacity_steps", 1)]:
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for name in ("beta", "capacity_max"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "traversal_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


# --- Model ---


class MLP(nn.Sequential):
    """in -> hidden -> hidden -> out, ReLU between layers."""

    def __init__(self, d_in, hidden, d_out):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


# --- The method ---


class BetaVAE(nn.Module):
    def __init__(self, hidden=512, latent_dim=10, beta=4.0, capacity_max=0.0, gamma=1000.0, capacity_steps=15000):
        super().__init__()
        self.latent_dim, self.beta = latent_dim, beta
        self.capacity_max, self.gamma, self.capacity_steps = capacity_max, gamma, capacity_steps
        self.encoder = MLP(784, hidden, 2 * latent_dim)  # x -> (mu, logvar) of q(z|x)
        self.decoder = MLP(latent_dim, hidden, 784)  # z -> Bernoulli logits of p(x|z)

    def encode(self, x):  # (B, 1, 28, 28) in [0, 1] -> mu, logvar: (B, latent_dim) each
        mu, logvar = self.encoder(x.flatten(1)).float().chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):  # (B, latent_dim) -> logits (B, 1, 28, 28)
        return self.decoder(z).float().view(-1, 1, 28, 28)

    @staticmethod
    def kl_per_dim(mu, logvar):
        """Eq. 5.3: KL(N(mu_j, sigma_j^2) || N(0, 1)) for each latent dimension j, in nats. (B, latent_dim)"""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)

    def capacity(self, step):
        """Eq. 5.8: the target rate C grows linearly from 0 at step 0 to C_max at capacity_steps, then stays."""
        return self.capacity_max * min(step / self.capacity_steps, 1.0)

    def terms(self, x):
        """Distortion and rate of each image of a batch, in nats (Eq. 5.1, one-sample estimate): the BCE of
        x under the decoder at one reparameterized z ~ q(z|x) (section 4), and the closed-form KL per dimension."""
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # (B, latent_dim) reparameterization
        logits = self.decode(z)
        bce = F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)  # (B,)
        return bce, self.kl_per_dim(mu, logvar)  # (B,), (B, latent_dim)

    def loss(self, x, step=0):
        """Eq. 5.6 (beta-VAE), or Eq. 5.7 (capacity annealing) when capacity_max > 0.
        Returns (loss, bce, kl), each averaged over the batch."""
        bce, kl_dims = self.terms(x)
        bce, kl = bce.mean(), kl_dims.sum(1).mean()
        if self.capacity_max > 0:
            return bce + self.gamma * (kl - self.capacity(step)).abs(), bce, kl
        return bce + self.beta * kl, bce, kl

    @torch.no_grad()
    def sample(self, n):
        """Ancestral sampling from the prior: z ~ N(0, I), shown as the Bernoulli means sigmoid(logits)."""
        z = torch.randn(n, self.latent_dim, device=next(self.parameters()).device)
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def traverse(self, x, dims, values):
        """Latent traversal (Higgins et al., Fig. 1): start from the posterior mean mu(x) of one image,
        set z_j to each of `values` for each j in `dims`, decode. (len(dims) * len(values), 1, 28, 28)"""
        mu, _ = self.encode(x[:1])  # (1, latent_dim)
        z = mu.repeat(len(dims) * len(values), 1)
        for row, j in enumerate(dims):
            z[row * len(values):(row + 1) * len(values), j] = values
        return torch.sigmoid(self.decode(z))


# --- Pictures of the latent space (2-D only) ---


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_latent_space(mu, labels, path, size=600, lim=4.0):
    """Scatter of the posterior means mu (N, 2) over [-lim, lim]^2, one colour per digit class, with a
    legend. Axes cross at the origin, ticks at each integer: the prior N(0, I) has most mass within 2."""
    legend_w = 60
    image = Image.new("RGB", (size + legend_w, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    to_px = lambda v: (v + lim) / (2 * lim) * (size - 1)  # noqa: E731
    ticks = list(range(-int(lim), int(lim) + 1))
    for t in ticks:  # light grid at each integer, darker axes through the origin
        p = to_px(t)
        draw.line([(p, 0), (p, size)], fill=(235, 235, 235) if t else (160, 160, 160))
        draw.line([(0, size - 1 - p), (size, size - 1 - p)], fill=(235, 235, 235) if t else (160, 160, 160))
    order = np.random.default_rng(0).permutation(len(mu))  # draw classes interleaved, not 9 on top of all
    for (u, v), c in zip(mu[order], labels[order]):
        if abs(u) < lim and abs(v) < lim:
            x, y = to_px(u), size - 1 - to_px(v)
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=PALETTE[c])
    for t in ticks[1:-1]:
        if t:
            draw.text((to_px(t) + 2, to_px(0) + 2), str(t), fill="black", font=font)  # z_1 ticks
            draw.text((to_px(0) + 3, size - 1 - to_px(t) + 2), str(t), fill="black", font=font)  # z_2 ticks
    draw.text((size + 8, 8), "digit", fill="black", font=font)
    for c in range(10):
        draw.rectangle([size + 10, 30 + 22 * c, size + 22, 42 + 22 * c], fill=PALETTE[c])
        draw.text((size + 30, 30 + 22 * c), str(c), fill="black", font=font)
    draw.text((size - 24, to_px(0) - 14), "z_1", fill="black", font=font)
    draw.text((to_px(0) + 4, 4), "z_2", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@torch.no_grad()
def manifold(model, n=16):
    """Decode an n x n grid of z at the prior's quantiles 1/(2n) ... 1 - 1/(2n) (Kingma and Welling, Fig. 4):
    z_1 grows left to right, z_2 bottom to top, matching latent_space.png. (n * n, 1, 28, 28)"""
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n) + 0.5) / n)  # (n,)
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")  # row r holds z_2 = q[n - 1 - r]
    z = torch.stack([z1.flatten(), z2.flatten()], 1).to(next(model.parameters()).device)
    return torch.sigmoid(model.decode(z))


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=1000):
    """Test distortion (BCE), rate (KL) and per-dimension rate, in nats per image (Eq. 5.1, 5.3).
    BCE + KL is the negative ELBO of the plain VAE (beta = 1) whatever beta was used in training."""
    bce, kl_dims = 0.0, torch.zeros(model.latent_dim, device=x_test.device)
    for i in range(0, len(x_test), batch_size):
        b, k = model.terms(x_test[i:i + batch_size])  # (B,), (B, latent_dim)
        bce, kl_dims = bce + b.sum().item(), kl_dims + k.sum(0)
    kl_dims = kl_dims.cpu() / len(x_test)
    return bce / len(x_test), kl_dims.sum().item(), kl_dims


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x_test, y_test = load_mnist(cfg.data_dir, train=False)
    x_test = x_test.to(device).float().div(255).unsqueeze(1)

    model = BetaVAE(cfg.hidden, cfg.latent_dim, cfg.beta, cfg.capacity_max, cfg.gamma, cfg.capacity_steps).to(device)
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
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="beta_vae")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            # 2. encode, sample z by reparameterization, decode; distortion + beta * rate (Eq. 5.6 or 5.7)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss, bce, kl = model.loss(x, step)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step on encoder and decoder together
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.1f}", bce=f"{bce.item():.1f}", kl=f"{kl.item():.2f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                bce_test, kl_test, _ = evaluate(model, x_test)
                model.train()
                target = f", target rate C {model.capacity(step):.1f}" if cfg.capacity_max > 0 else ""
                bar.write(f"step {step}: test distortion (BCE) {bce_test:.2f}, rate (KL) {kl_test:.2f} nats{target}")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()

    model.eval()
    bce, kl, kl_dims = evaluate(model, x_test)
    print(f"test distortion (BCE) {bce:.2f} nats, rate (KL) {kl:.2f} nats, BCE + KL {bce + kl:.2f} nats per image "
          f"after {step} steps, {time.time() - t0:.0f} s")
    checkpoint()

    # traversal: one row per latent dimension, most informative (largest KL) first; a dimension with
    # KL near 0 is switched off (q(z_j|x) = prior for every x) and its row shows no change
    dims = kl_dims.argsort(descending=True).tolist()
    print("KL per dimension (nats), traversal.png rows top to bottom: "
          + ", ".join(f"z_{j} {kl_dims[j]:.2f}" for j in dims))
    values = torch.linspace(-cfg.traversal_range, cfg.traversal_range, 11, device=device)
    save_grid(model.traverse(x_test[:1], dims, values), out / "traversal.png", nrow=len(values))
    written = ["samples.png", "samples.npz", "traversal.png"]
    if cfg.latent_dim == 2:
        mu = torch.cat([model.encode(x_test[i:i + 1000])[0] for i in range(0, len(x_test), 1000)])
        save_latent_space(mu.detach().cpu().numpy(), y_test.numpy(), out / "latent_space.png")
        save_grid(manifold(model), out / "manifold.png", nrow=16)
        written += ["latent_space.png", "manifold.png"]
    samples = model.sample(cfg.num_samples)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return {"test_bce": bce, "test_kl": kl, "test_neg_elbo": bce + kl, "kl_per_dim": kl_dims.tolist(), "step": step}


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
