"""
Sparse autoencoder: an over-complete code that a sparsity penalty keeps from copying the input.

Paper: Andrew Ng, "Sparse autoencoder", CS294A lecture notes, Stanford 2011 (no arXiv id).
Background: Olshausen and Field, "Emergence of simple-cell receptive field properties by learning
a sparse code for natural images", Nature 1996; L1 codes: Lee, Battle, Raina and Ng, "Efficient
sparse coding algorithms", NIPS 2006 (no arXiv ids).

The idea: with more code units than pixels (K = 1024 > 784), an autoencoder can pass its input
straight through the code and reconstruct well while learning nothing about digits (README
Eq. 2.3). A sparsity penalty takes that solution away: rho_hat_j, the mean activation of unit j
over the batch, is pulled to a small target rho = 0.05 by the KL divergence between two coins,
Bernoulli(rho) and Bernoulli(rho_hat_j). A unit allowed to be on about 5 % of the time has to
specialize, so it comes to stand for a part or a prototype of a digit: features.png draws each
unit's decoder weights. --penalty l1 penalizes the code's L1 norm instead; --penalty none drops
the penalty. The script reports the mean activation and the fraction of (image, unit) pairs with
z > 1/2, which are not the same: the KL pins a mean, not how it is spread (README Eq. 2.10). Like
any autoencoder this is not a generative model: samples decode a Gaussian fitted to the
pre-activations W1 x + b1 (README Eq. 2.9).

    z = sigmoid(W1 x + b1),  x_hat = sigmoid(W2 z + b2)                       (README Eq. 2.1)
    rho_hat_j = (1/B) sum_b z_bj                                                (README Eq. 2.4)
    KL(rho || q) = rho log(rho/q) + (1-rho) log((1-rho)/(1-q))                  (README Eq. 2.5)
    L = (1/B) sum_b ||x_b - x_hat_b||^2 + beta sum_j KL(rho || rho_hat_j)       (README Eq. 2.6)

Run:   python 01_autoencoders/sparse_autoencoder.py            (defaults sized for one GPU)
CPU recipe: python 01_autoencoders/sparse_autoencoder.py --steps 6000
Measured on this 2-core CPU: 1 min 16 s (wall, whole command), test squared error 4.95 per image,
mean activation 0.0495, fraction active (z > 1/2) 0.0047, 132 of 1024 units never active.
Writes out/sparse_autoencoder/: ckpt.pt, samples.png, samples.npz, reconstructions.png, features.png.
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
from PIL import Image
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/sparse_autoencoder"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step; rho_hat (README Eq. 2.4) is a mean over this batch
    lr: float = 1e-3  # Adam learning rate
    latent_dim: int = 1024  # code units K; more than 784 makes the code over-complete
    penalty: str = "kl"  # kl: beta sum_j KL(rho || rho_hat_j) (README Eq. 2.6) | l1: lam sum_j |z_j| (Eq. 2.8) | none (free to copy x, Eq. 2.3)
    rho: float = 0.05  # target mean activation of every unit (KL penalty)
    beta: float = 3.0  # weight of the KL penalty
    lam: float = 0.1  # weight of the L1 penalty
    num_samples: int = 1000  # images decoded from the Gaussian fitted to the pre-activations, for samples.npz
    log_every: int = 1000  # steps between test evaluations, checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.penalty not in ("kl", "l1", "none"):
            raise ValueError(f"--penalty must be kl, l1 or none, got {self.penalty!r}")
        if not 0 < self.rho < 1:
            raise ValueError(f"--rho must lie strictly between 0 and 1, got {self.rho}")
        if self.beta < 0 or self.lam < 0:
            raise ValueError(f"--beta and --lam must be non-negative, got {self.beta} and {self.lam}")
        if self.latent_dim < 1:
            raise ValueError(f"--latent-dim must be at least 1, got {self.latent_dim}")


# --- The method ---


def bernoulli_kl(rho, q):
    """Eq. 2.5: KL(Bernoulli(rho) || Bernoulli(q)), elementwise in q. Zero only at q = rho.
    q is clamped away from 0 and 1, where the divergence is infinite."""
    q = q.clamp(1e-6, 1 - 1e-6)
    return rho * torch.log(rho / q) + (1 - rho) * torch.log((1 - rho) / (1 - q))


class SparseAutoencoder(nn.Module):
    """One sigmoid layer each way (Ng's notes): K code units in (0, 1), near 1 meaning "on"."""

    def __init__(self, latent_dim=1024, penalty="kl", rho=0.05, beta=3.0, lam=0.1):
        super().__init__()
        self.penalty, self.rho, self.beta, self.lam = penalty, rho, beta, lam
        self.encoder = nn.Linear(784, latent_dim)  # W1 (K, 784), b1 (K,)
        self.decoder = nn.Linear(latent_dim, 784)  # W2 (784, K), b2 (784,)
        # Gaussian fitted to the training pre-activations a = W1 x + b1 (Eq. 2.9); see fit_code_gaussian
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_chol", torch.eye(latent_dim))

    def encode(self, x):  # (B, 1, 28, 28) in [0, 1] -> (B, K) in (0, 1)
        return torch.sigmoid(self.encoder(x.flatten(1)))

    def decode(self, z):  # (B, K) -> (B, 1, 28, 28) in (0, 1)
        return torch.sigmoid(self.decoder(z)).view(-1, 1, 28, 28)

    def sparsity(self, z):
        """The penalty on a batch of codes z (B, K), in float32 even under autocast."""
        z = z.float()
        if self.penalty == "kl":  # Eq. 2.6: average over the batch first, then compare with rho
            rho_hat = z.mean(0)  # (K,) Eq. 2.4
            return self.beta * bernoulli_kl(self.rho, rho_hat).sum()
        if self.penalty == "l1":  # Eq. 2.8: z > 0, so |z_j| = z_j
            return self.lam * z.abs().sum(1).mean()
        return z.new_zeros(())

    def loss(self, x):
        """Eq. 2.6 (or 2.8): squared error summed over pixels, averaged over the batch, plus the
        sparsity penalty. Returns (objective, squared error)."""
        z = self.encode(x)  # (B, K)
        x_hat = self.decode(z)  # (B, 1, 28, 28)
        recon = (x_hat - x).pow(2).flatten(1).sum(1).mean()
        return recon + self.sparsity(z), recon

    @torch.no_grad()
    def fit_code_gaussian(self, x):
        """Eq. 2.9: mean and Cholesky factor of the covariance of the pre-activations W1 x + b1.
        The jitter makes the covariance positive definite: its rank is at most 784 < K."""
        a = self.encoder(x.flatten(1)).double()  # (N, K)
        cov = torch.cov(a.T) + 1e-6 * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        self.code_mean.copy_(a.mean(0))
        self.code_chol.copy_(torch.linalg.cholesky(cov))

    @torch.no_grad()
    def sample(self, n):
        """Decode z = sigmoid(a), a ~ N(code_mean, code_chol code_chol^T): always a valid code in (0, 1)^K."""
        eps = torch.randn(n, self.code_mean.shape[0], device=self.code_mean.device)
        return self.decode(torch.sigmoid(self.code_mean + eps @ self.code_chol.T)).clamp(0, 1)

    @torch.no_grad()
    def features(self, n=100):
        """The first n units as images: column j of W2 is what turning unit j on adds to the output
        logits, the "part" that unit stands for. Each tile is scaled to unit norm, then to [0, 1]."""
        w = self.decoder.weight.T[:n].float()  # (n, 784)
        w = w / w.norm(dim=1, keepdim=True)
        low, high = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
        return ((w - low) / (high - low + 1e-12)).view(-1, 1, 28, 28)


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=1000):
    """Test squared error per image (Eq. 2.2) and how sparse the code is (Eq. 2.10): the mean activation
    over images and units, the fraction of (image, unit) pairs that are active (z > 1/2, i.e. a positive
    pre-activation), and how many units are active on no test image at all."""
    squared = activation = active = 0.0
    ever = torch.zeros(model.encoder.out_features, dtype=torch.bool, device=x_test.device)
    for i in range(0, len(x_test), batch_size):
        x = x_test[i:i + batch_size]
        z = model.encode(x)  # (b, K)
        squared += (model.decode(z) - x).pow(2).sum().item()
        activation += z.sum().item()
        on = z > 0.5
        active += on.sum().item()
        ever |= on.any(0)
    n, k = len(x_test), model.encoder.out_features
    return {"test_mse": squared / n, "mean_activation": activation / (n * k), "frac_active": active / (n * k),
            "never_active": int((~ever).sum())}


def report(m):
    """One line of the figures evaluate measured."""
    return (f"test squared error {m['test_mse']:.2f} per image, mean activation {m['mean_activation']:.4f}, "
            f"fraction active {m['frac_active']:.4f}, units never active {m['never_active']}")


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x_test = load_mnist(cfg.data_dir, train=False)[0].to(device).float().div(255).unsqueeze(1)

    model = SparseAutoencoder(cfg.latent_dim, cfg.penalty, cfg.rho, cfg.beta, cfg.lam).to(device)
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
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="sparse_autoencoder")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            # 2. reconstruct it; squared error plus the sparsity penalty on this batch's codes (Eq. 2.6)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss, recon = model.loss(x)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step on encoder and decoder together (the penalty's gradient: Eq. 2.7)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}", recon=f"{recon.item():.2f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                bar.write(f"step {step}: {report(evaluate(model, x_test))}")
                model.train()
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()

    model.eval()
    metrics = evaluate(model, x_test)
    print(f"{report(metrics)} after {step} steps, {time.time() - t0:.0f} s")
    model.fit_code_gaussian(x_train[:10000])
    checkpoint()

    # reconstructions: odd rows are test digits, even rows their reconstructions
    x = x_test[:32]
    with torch.no_grad():
        x_hat = model.decode(model.encode(x)).clamp(0, 1)
    pairs = torch.stack([x.view(4, 8, 1, 28, 28), x_hat.view(4, 8, 1, 28, 28)], 1).view(64, 1, 28, 28)
    save_grid(pairs, out / "reconstructions.png", nrow=8)
    save_grid(model.features(100), out / "features.png", nrow=10)
    samples = model.sample(cfg.num_samples)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'}, {out / 'reconstructions.png'} and {out / 'features.png'}")
    return {**metrics, "step": step}


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
