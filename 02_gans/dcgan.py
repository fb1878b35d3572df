"""
DCGAN: a convolutional GAN that trains stably, by following a few architecture rules.

Paper: Radford, Metz and Chintala, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", 2015, arXiv 1511.06434. The game: Goodfellow et al., "Generative
Adversarial Nets", 2014, arXiv 1406.2661.

The idea: the GAN game of section 1, played by two convolutional networks built by the paper's
rules. Strided convolutions instead of pooling, so each network learns its own down- or
up-sampling; batch norm in every layer except G's output and D's input; no fully connected hidden
layers; ReLU in G with a tanh output, LeakyReLU(0.2) in D; weights drawn from N(0, 0.02); Adam with
lr 2e-4 and beta1 0.5. The paper's 64 x 64 networks (widths 1024-512-256-128) are scaled to 28 x 28
by dropping one doubling: G projects z to 4c x 4 x 4, then 7, 14, 28; D mirrors it (README table).
An optional exponential moving average of G's weights (--ema) is what we sample from when on, and
--accept < 1 lets D choose among G's samples by rejection with its density-ratio estimate (README Eq. 2.10).

    L_D = -E_x log D(x) - E_z log(1 - D(G(z)))                (README Eq. 2.1)
    L_G = -E_z log D(G(z))            (non-saturating)         (README Eq. 2.2)
    out = (in - 1) s - 2p + k  (transposed conv), floor((in + 2p - k) / s) + 1 (conv)   (Eq. 2.3)
    G_ema <- beta G_ema + (1 - beta) G,  beta = min(ema, (1 + t) / (10 + t))   (README Eq. 2.7)
    keep x ~ G with probability min(1, exp(a(x) - b)), a = D's logit ~ log p_data / p_g   (README Eq. 2.9, 2.10)

Run:   python 02_gans/dcgan.py                                (the paper's settings; not measured on a GPU)
CPU recipe: python 02_gans/dcgan.py --steps 11000 --channels 32 --batch-size 64 --ema 0.999 --accept 0.1
Measured on a 2-core CPU: 8 min 30 s (wall, whole command), FID 25.6 at N = 1000 (IS 8.37, precision 0.639,
recall 0.894), 82.0 % confident, every class >= 6.9 %: recognizable digits. Without --accept (the same
training): FID 26.4, 78.4 % confident. The paper's settings for the same time (740 steps, 9 min 27 s): FID 94.0.
Seed 0 all; README section 2.
Writes out/dcgan/: ckpt.pt, samples.png, samples.npz.
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
    amp: bool = False  # bf16 autocast on CUDA or CPU
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/dcgan"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps (each: one D update, then one G update)
    batch_size: int = 128  # real images per step (and as many fakes); the paper's 128
    lr: float = 2e-4  # Adam learning rate of G and D (the paper's 2e-4; 1e-3 oscillated for its authors)
    lr_decay: bool = False  # decay both learning rates linearly to 0 over the steps (the paper keeps them constant)
    beta1: float = 0.5  # Adam's momentum coefficient (the paper's 0.5; 0.9 oscillated; README Eq. 2.6)
    beta2: float = 0.999  # Adam's second-moment coefficient
    channels: int = 128  # c: D's widths are c, 2c, 4c and G's 4c, 2c, c (the paper's 128-256-512 at c = 128)
    latent_dim: int = 100  # size of z ~ U(-1, 1)^latent_dim (the paper's 100)
    ema: float = 0.0  # decay of an exponential moving average of G's weights, sampled from when > 0 (0: off, as in the paper)
    accept: float = 1.0  # discriminator rejection sampling: keep this share of G's samples, weighted by D (README Eq. 2.10); 1: off, as in the paper
    num_samples: int = 1000  # images generated for samples.npz
    log_every: int = 1000  # steps between checkpoints and sample grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.channels < 1 or self.latent_dim < 1:
            raise ValueError(f"--channels and --latent-dim must be at least 1, got {self.channels} and {self.latent_dim}")
        for name in ("beta1", "beta2", "ema"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.accept <= 1:
            raise ValueError(f"--accept must be in (0, 1], got {self.accept}")


# --- Model ---


def up(c_in, c_out, kernel, stride, padding):
    """Fractionally-strided (transposed) convolution, batch norm, ReLU: G's hidden layer (Eq. 2.3)."""
    return [nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def down(c_in, c_out, kernel, stride, padding):
    """Strided convolution, batch norm, LeakyReLU(0.2): D's hidden layer (Eq. 2.3). The leak lets
    G's gradient through units that are off (Eq. 2.5)."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]


class Generator(nn.Sequential):
    """z (B, latent_dim, 1, 1) -> x (B, 1, 28, 28) in [-1, 1]. The paper's G without its widest layer."""

    def __init__(self, latent_dim=100, c=128):
        super().__init__(
            *up(latent_dim, 4 * c, 4, 1, 0),  # (B, 4c, 4, 4): "project and reshape", a matrix multiplication
            *up(4 * c, 2 * c, 3, 2, 1),  # (B, 2c, 7, 7): (4 - 1) 2 - 2 + 3 = 7
            *up(2 * c, c, 4, 2, 1),  # (B, c, 14, 14)
            nn.ConvTranspose2d(c, 1, 4, 2, 1),  # (B, 1, 28, 28): no batch norm on the output layer
            nn.Tanh(),  # pixels in [-1, 1], like the scaled data
        )


class Discriminator(nn.Sequential):
    """x (B, 1, 28, 28) -> logit (B,): D(x) = sigmoid(logit). G's layers mirrored."""

    def __init__(self, c=128):
        super().__init__(
            nn.Conv2d(1, c, 4, 2, 1), nn.LeakyReLU(0.2),  # (B, c, 14, 14): no batch norm on the input layer
            *down(c, 2 * c, 4, 2, 1),  # (B, 2c, 7, 7)
            *down(2 * c, 4 * c, 3, 2, 1),  # (B, 4c, 4, 4): (7 + 2 - 3) // 2 + 1 = 4
            nn.Conv2d(4 * c, 1, 4, 1, 0),  # (B, 1, 1, 1): the last feature map, flattened into one unit
            nn.Flatten(0),  # (B,)
        )


def init_weights(module):
    """DCGAN's initialization (Radford et al. 2015; CycleGAN uses it too): every weight from N(0, 0.02),
    biases 0; batch-norm scales from N(1, 0.02), as in the DCGAN code, so a fresh layer passes its input on."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --- The method ---


class DCGAN(nn.Module):
    def __init__(self, latent_dim=100, channels=128, ema=0.0):
        super().__init__()
        self.latent_dim, self.ema = latent_dim, ema
        self.G = Generator(latent_dim, channels)
        self.D = Discriminator(channels)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False).eval() if ema > 0 else None

    def noise(self, n):
        """z ~ U(-1, 1)^latent_dim, the paper's prior, shaped (n, latent_dim, 1, 1) for the first layer."""
        return torch.rand(n, self.latent_dim, 1, 1, device=next(self.parameters()).device) * 2 - 1

    def d_loss(self, x, fake):
        """Eq. 2.1: -log D(x) - log(1 - D(G(z))), with -log sigmoid(a) = softplus(-a) for stability.
        Real and fake go through D as separate batches, so batch norm never mixes them."""
        return F.softplus(-self.D(x)).mean() + F.softplus(self.D(fake)).mean()

    def g_loss(self, fake):
        """Eq. 2.2: the non-saturating -log D(G(z)), strong gradients while D still wins easily."""
        return F.softplus(-self.D(fake)).mean()

    @torch.no_grad()
    def update_ema(self, step):
        """Eq. 2.7: G_ema <- beta G_ema + (1 - beta) G with beta = min(ema, (1 + t) / (10 + t)), so the
        random initial weights are forgotten early. Weights only: the batch-norm statistics of G_ema
        come from standing_statistics."""
        beta = min(self.ema, (1 + step) / (10 + step))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p, 1 - beta)

    @torch.no_grad()
    def standing_statistics(self, batches=20, batch_size=250):
        """Batch-norm statistics of the averaged G, measured on fresh batches of z (Brock et al. 2018):
        G's running averages belong to G's weights, not to their moving average."""
        for m in self.G_ema.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        self.G_ema.train()
        for _ in range(batches):
            self.G_ema(self.noise(batch_size))
        for m in self.G_ema.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        self.G_ema.eval()

    @torch.no_grad()
    def sample(self, n, accept=1.0, d_batch=128, batch_size=500):
        """n images (n, 1, 28, 28) in [0, 1] from G_ema when it exists, else G; batch norm uses its
        stored statistics (eval mode), so a sample does not depend on the rest of its batch. With
        accept < 1, about n / accept candidates are drawn and D chooses among them (rejection_sample):
        D runs in training mode on batches of d_batch fakes, as it saw fakes in training, and on a
        copy, so its stored batch-norm statistics stay as they are."""
        G = self.G_ema if self.G_ema is not None else self.G
        was_training = G.training
        G.eval()
        pool = n if accept >= 1 else d_batch * math.ceil(2 * n / accept / d_batch)  # twice the expected need
        x = torch.cat([G(self.noise(min(batch_size, pool - i))) for i in range(0, pool, batch_size)]).float()
        G.train(was_training)
        if accept < 1:
            D = copy.deepcopy(self.D).train()
            logits = torch.cat([D(x[i:i + d_batch]) for i in range(0, pool, d_batch)]).float()
            x = rejection_sample(x, logits, n, accept)
        return (x + 1) / 2


def rejection_sample(x, logits, n, accept, generator=None):
    """Discriminator rejection sampling (Azadi et al., ICLR 2019, arXiv 1810.06758; README Eq. 2.9 to 2.11).
    D's logit a(x) estimates log p_data(x) / p_g(x) (Eq. 1.3 at D*), so keeping each candidate x ~ p_g with
    probability min(1, exp(a(x) - b)) leaves samples from a density proportional to min(p_data, e^b p_g):
    p_data itself wherever the ratio stays below e^b. b is the threshold at which, on these candidates, the
    expected share kept is `accept` (bisection). Returns the first n kept, in the order drawn."""
    lo, hi = logits.min().item() - 30, logits.max().item() + 30  # keeps all, keeps ~none
    for _ in range(60):
        b = (lo + hi) / 2
        lo, hi = (b, hi) if (logits - b).exp().clamp(max=1).mean() > accept else (lo, b)
    u = torch.rand(len(logits), generator=generator, device=logits.device)
    kept = x[u < (logits - b).exp().clamp(max=1)]
    if len(kept) < n:
        raise RuntimeError(f"rejection sampling kept {len(kept)} of {len(x)} candidates, fewer than {n}")
    return kept[:n]


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = DCGAN(cfg.latent_dim, cfg.channels, cfg.ema).to(device)
    opt = {"G": torch.optim.Adam(model.G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)),
           "D": torch.optim.Adam(model.D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))}
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        saved = {k: ckpt["config"][k] for k in ("channels", "latent_dim")}
        if saved != {"channels": cfg.channels, "latent_dim": cfg.latent_dim} or (cfg.ema > 0) != ("ema" in ckpt):
            raise SystemExit(f"error: {out / 'ckpt.pt'} was trained with {saved}, ema {ckpt['config']['ema']}; "
                             f"pass the same --channels, --latent-dim and --ema")
        for name in ("G", "D"):
            getattr(model, name).load_state_dict(ckpt["model"][name])
            opt[name].load_state_dict(ckpt["optimizer"][name])
        if model.G_ema is not None:
            model.G_ema.load_state_dict(ckpt["ema"])
        step = ckpt["step"]

    def checkpoint():
        state = {"model": {"G": model.G.state_dict(), "D": model.D.state_dict()},
                 "optimizer": {"G": opt["G"].state_dict(), "D": opt["D"].state_dict()},
                 "config": asdict(cfg), "step": step}
        if model.G_ema is not None:
            state["ema"] = model.G_ema.state_dict()
        save_checkpoint(out / "ckpt.pt", state)

    def snapshot():  # refresh G_ema's batch-norm statistics, save a grid and the checkpoint
        if model.G_ema is not None:
            model.standing_statistics()
        save_grid(model.sample(64), out / "samples.png", nrow=8)
        checkpoint()

    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device)  # (N, 28, 28) uint8
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type in ("cuda", "cpu"))
    d_loss = g_loss = float("nan")
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="dcgan")
    try:
        while step < cfg.steps and not cfg.sample_only:
            for group in opt["G"].param_groups + opt["D"].param_groups:  # constant, or linear decay to 0
                group["lr"] = cfg.lr * (1 - step / cfg.steps) if cfg.lr_decay else cfg.lr
            # 1. a random batch of real digits scaled to [-1, 1] (the range of G's tanh), and fakes G(z)
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            x = x.float().div(127.5).sub(1).unsqueeze(1)  # (B, 1, 28, 28)
            with torch.autocast(**autocast):
                fake = model.G(model.noise(cfg.batch_size))  # (B, 1, 28, 28)
            # 2. D step: tell real from fake (Eq. 2.1); detach so G gets no gradient from it
            with torch.autocast(**autocast):
                loss_d = model.d_loss(x, fake.detach())
            if not torch.isfinite(loss_d):
                raise SystemExit(f"error: D loss is {loss_d.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            opt["D"].zero_grad(set_to_none=True)
            loss_d.backward()
            opt["D"].step()
            # 3. G step: fool the updated D with the same fakes (Eq. 2.2); D is held fixed
            model.D.requires_grad_(False)
            with torch.autocast(**autocast):
                loss_g = model.g_loss(fake)
            model.D.requires_grad_(True)
            if not torch.isfinite(loss_g):
                raise SystemExit(f"error: G loss is {loss_g.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            opt["G"].zero_grad(set_to_none=True)
            loss_g.backward()
            opt["G"].step()
            # 4. the moving average of G's weights (Eq. 2.7)
            if model.G_ema is not None:
                model.update_ema(step)
            step += 1
            d_loss, g_loss = loss_d.item(), loss_g.item()
            bar.update(1)
            bar.set_postfix(d=f"{d_loss:.3f}", g=f"{g_loss:.3f}", refresh=False)
            if step % cfg.log_every == 0 and step < cfg.steps:
                snapshot()
                bar.write(f"step {step}: D loss {d_loss:.3f}, G loss {g_loss:.3f}")
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    seconds = time.time() - t0
    if not cfg.sample_only:
        if model.G_ema is not None:
            model.standing_statistics()
        checkpoint()
        print(f"D loss {d_loss:.3f}, G loss {g_loss:.3f} after {step} steps, {seconds:.0f} s")

    samples = model.sample(cfg.num_samples, cfg.accept, cfg.batch_size)  # (num_samples, 1, 28, 28) in [0, 1]
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}")
    return {"d_loss": d_loss, "g_loss": g_loss, "step": step, "seconds": seconds}


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
