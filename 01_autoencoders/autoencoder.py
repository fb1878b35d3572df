"""
Autoencoder: compress an MNIST digit to 20 numbers, then reconstruct it.

Paper: Hinton and Salakhutdinov, "Reducing the Dimensionality of Data with Neural Networks",
Science 2006 (no arXiv id). Linear case: Baldi and Hornik, "Neural networks and principal
component analysis", Neural Networks 1989.

The idea: an encoder f maps a 784-pixel image x to a code z of 20 numbers, a decoder g maps the
code back, and both are trained so that g(f(x)) is close to x. The bottleneck forces the code
to keep what matters about the digit and drop the rest. With no nonlinearities (--linear) and
squared error, the best the network can do is project onto the top 20 principal components
(README Eq. 1.3), and the script measures how close it gets. An autoencoder is not a generative
model: nothing says which codes are valid. To sample anyway, we fit a Gaussian to the training
codes and decode draws from it (README Eq. 1.4), the gap the VAE closes.

    z = f(x),  x_hat = g(z)                                  (README Eq. 1.1)
    L = E_x || x - g(f(x)) ||^2   (summed over pixels)        (README Eq. 1.2)

Run:   python 01_autoencoders/autoencoder.py                  (defaults sized for one GPU)
CPU recipe: python 01_autoencoders/autoencoder.py --steps 5000 --hidden 256
Measured on a 2-core CPU: 31 s, test squared error 7.00 per image (0.0089 per pixel); with --linear
18.59 (PCA with 20 components: 18.45), largest principal angle to the PCA subspace 7.3 degrees.
Writes out/autoencoder/: ckpt.pt, samples.png, samples.npz, reconstructions.png.
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
    out_dir: str = "out/autoencoder"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam learning rate
    hidden: int = 512  # width of the two hidden layers of encoder and decoder
    latent_dim: int = 20  # size of the code z: the bottleneck
    linear: bool = False  # no nonlinearities, no sigmoid: the optimum spans the PCA subspace (README Eq. 1.3)
    num_samples: int = 1000  # images decoded from the Gaussian fitted to the codes, for samples.npz
    log_every: int = 1000  # steps between test evaluations, checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt


# --- Model ---


class MLP(nn.Sequential):
    """in -> hidden -> hidden -> out, ReLU between layers (none at all when linear)."""

    def __init__(self, d_in, hidden, d_out, linear=False):
        act = nn.Identity if linear else nn.ReLU
        super().__init__(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, d_out))


# --- The method ---


class Autoencoder(nn.Module):
    def __init__(self, hidden=512, latent_dim=20, linear=False):
        super().__init__()
        self.linear = linear
        self.encoder = MLP(784, hidden, latent_dim, linear)  # f: x -> z
        self.decoder = MLP(latent_dim, hidden, 784, linear)  # g: z -> x_hat
        # Gaussian fitted to the training codes (Eq. 1.4); filled by fit_code_gaussian
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_chol", torch.eye(latent_dim))

    def encode(self, x):  # (B, 1, 28, 28) in [0, 1] -> (B, latent_dim)
        return self.encoder(x.flatten(1))

    def decode(self, z):  # (B, latent_dim) -> (B, 1, 28, 28)
        logits = self.decoder(z)
        x_hat = logits if self.linear else torch.sigmoid(logits)  # sigmoid keeps pixels in [0, 1]
        return x_hat.view(-1, 1, 28, 28)

    def loss(self, x):
        """Eq. 1.2: squared error summed over the 784 pixels, averaged over the batch."""
        x_hat = self.decode(self.encode(x))
        return (x_hat - x).pow(2).flatten(1).sum(1).mean()

    @torch.no_grad()
    def fit_code_gaussian(self, x):
        """Eq. 1.4: mean and Cholesky factor of the covariance of the codes of x."""
        z = self.encode(x).double()
        cov = torch.cov(z.T) + 1e-6 * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        self.code_mean.copy_(z.mean(0))
        self.code_chol.copy_(torch.linalg.cholesky(cov))

    @torch.no_grad()
    def sample(self, n):
        """Decode z ~ N(code_mean, code_chol code_chol^T)."""
        eps = torch.randn(n, self.code_mean.shape[0], device=self.code_mean.device)
        return self.decode(self.code_mean + eps @ self.code_chol.T).clamp(0, 1)


def pca_angle(model, x):
    """Largest principal angle (degrees) between the decoder's column space and the top-k
    principal subspace of x (Eq. 1.3). Near 0 when a linear autoencoder has converged."""
    x = x.flatten(1).double()
    k = model.code_mean.shape[0]
    _, _, v = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    pcs = v[:k].T  # (784, k) top-k principal directions
    w = model.decoder[4].weight.double() @ model.decoder[2].weight.double() @ model.decoder[0].weight.double()
    basis, _ = torch.linalg.qr(w)  # (784, k) orthonormal basis of the decoder's span
    cosines = torch.linalg.svdvals(pcs.T @ basis).clamp(max=1.0)
    return math.degrees(math.acos(cosines.min().item()))


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=1000):
    """Test squared error per image (Eq. 1.2), and per pixel."""
    total = sum(model.loss(x_test[i:i + batch_size]).item() * len(x_test[i:i + batch_size])
                for i in range(0, len(x_test), batch_size))
    per_image = total / len(x_test)
    return per_image, per_image / 784


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x_test = load_mnist(cfg.data_dir, train=False)[0].to(device).float().div(255).unsqueeze(1)

    model = Autoencoder(cfg.hidden, cfg.latent_dim, cfg.linear).to(device)
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
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="autoencoder")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of training digits
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            # 2. reconstruct it and measure the squared error (Eq. 1.2)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = model.loss(x)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step on encoder and decoder together
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                mse, mse_pixel = evaluate(model, x_test)
                model.train()
                bar.write(f"step {step}: test squared error {mse:.2f} per image ({mse_pixel:.5f} per pixel)")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()

    model.eval()
    mse, mse_pixel = evaluate(model, x_test)
    print(f"test squared error {mse:.2f} per image ({mse_pixel:.5f} per pixel) after {step} steps, "
          f"{time.time() - t0:.0f} s")
    if cfg.linear:
        print(f"largest principal angle to the top-{cfg.latent_dim} PCA subspace: {pca_angle(model, x_train):.2f} degrees")
    model.fit_code_gaussian(x_train[:10000])
    checkpoint()

    # reconstructions: odd rows are test digits, even rows their reconstructions
    x = x_test[:32]
    with torch.no_grad():
        x_hat = model.decode(model.encode(x)).clamp(0, 1)
    pairs = torch.stack([x.view(4, 8, 1, 28, 28), x_hat.view(4, 8, 1, 28, 28)], 1).view(64, 1, 28, 28)
    save_grid(pairs, out / "reconstructions.png", nrow=8)
    samples = model.sample(cfg.num_samples)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} and {out / 'reconstructions.png'}")
    return {"test_mse": mse, "test_mse_pixel": mse_pixel, "step": step}


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
