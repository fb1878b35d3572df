"""
GAN: a generator and a discriminator play a minimax game; at its equilibrium the generator's samples
are distributed like the data.

Paper: Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville and Bengio, "Generative
Adversarial Nets", 2014, arXiv 1406.2661.

The idea: a generator G maps noise z ~ N(0, I) to an image; a discriminator D maps an image to the
probability that it is real. D is trained to tell data from G's samples, G to fool D. For a fixed G the
best D is D*(x) = p_data(x) / (p_data(x) + p_g(x)), and against D* the generator minimizes
2 JSD(p_data || p_g) - log 4, whose only minimum is p_g = p_data. The game as written gives G almost no
gradient early on, when D rejects its samples with confidence: through D's sigmoid, the gradient of
log(1 - D(G(z))) with respect to D's logit is -D(G(z)), which vanishes as D(G(z)) -> 0. The paper's fix,
the non-saturating loss -log D(G(z)), has the same fixed point and a gradient of -(1 - D(G(z))), about -1
there. --g-loss picks the generator loss; the log prints D(G(z)) and the norm of G's gradient, so the
stall is visible. Both networks are MLPs (the paper's D used maxout and dropout; ours LeakyReLU and
dropout), trained with Adam (lr 2e-4, betas 0.5 and 0.999, from Radford et al. 2015, arXiv 1511.06434)
instead of the paper's SGD with momentum, one D step per G step (k = 1 in the paper's Algorithm 1).

    V(D, G) = E_x log D(x) + E_z log(1 - D(G(z))),   min_G max_D V         (README Eq. 1.1)
    D*(x) = p_data(x) / (p_data(x) + p_g(x))                                 (README Eq. 1.3)
    V(D*, G) = 2 JSD(p_data || p_g) - log 4                                  (README Eq. 1.5)
    minimax G loss  log(1 - D(G(z)));  non-saturating G loss  -log D(G(z))    (README Eq. 1.7, 1.8)
    d/dl of the two, l = D's logit:  -D(G(z))  and  -(1 - D(G(z)))             (README Eq. 1.9)

Run:   python 02_gans/gan.py                  (defaults sized for one GPU; not measured on a GPU)
       python 02_gans/gan.py --g-loss minimax (the saturating game, for comparison)
CPU recipe: python 02_gans/gan.py --steps 12000 --hidden 256 --log-every 500
Measured on a 2-core CPU: 2 min 4 s (wall, whole command), FID 289.8, IS 5.61, precision 0.563, recall 0.089
(metrics.py, N = 1000); not recognizable digits (class 1 is 25 % of the samples, class 0 2 %: partial mode
collapse). Over steps 1000 to 3000 the mean |grad G| is 7 to 11 here and 0.5 to 0.9 with --g-loss minimax.
Writes out/gan/: ckpt.pt, samples.png, samples.npz.
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
    out_dir: str = "out/gan"  # checkpoint, samples and grids go here
    steps: int = 30000  # optimizer steps (each one D step, then one G step)
    batch_size: int = 64  # real images (and as many fakes) per step
    lr: float = 2e-4  # Adam learning rate, both networks
    beta1: float = 0.5  # Adam beta1, both networks (0.9 makes the game oscillate)
    hidden: int = 1024  # width of the two hidden layers of G and of D
    latent_dim: int = 100  # size of the noise z
    dropout: float = 0.3  # dropout after each hidden layer of D, as in the paper (slows D down early)
    g_loss: str = "nonsaturating"  # generator loss: nonsaturating (-log D(G(z)), Eq. 1.8) | minimax (log(1 - D(G(z))), Eq. 1.7)
    num_samples: int = 1000  # images drawn from G for samples.npz
    log_every: int = 1000  # steps between log lines (means over the window), checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.g_loss not in ("nonsaturating", "minimax"):
            raise ValueError(f"--g-loss must be nonsaturating or minimax, got {self.g_loss!r}")
        if self.hidden < 1 or self.latent_dim < 1:
            raise ValueError(f"--hidden and --latent-dim must be at least 1, got {self.hidden} and {self.latent_dim}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"--beta1 must be in [0, 1), got {self.beta1}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")


# --- Model ---


class Generator(nn.Sequential):
    """z -> hidden -> hidden -> 784, ReLU, tanh output: an image with pixels in [-1, 1]."""

    def __init__(self, latent_dim=100, hidden=1024):
        super().__init__(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 784), nn.Tanh(), nn.Unflatten(1, (1, 28, 28)))


class Discriminator(nn.Sequential):
    """784 -> hidden -> hidden -> 1 logit l, LeakyReLU(0.2) and dropout; D(x) = sigmoid(l)."""

    def __init__(self, hidden=1024, dropout=0.3):
        super().__init__(nn.Flatten(), nn.Linear(784, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(hidden, 1))


# --- The method ---


def discriminator_loss(logit_real, logit_fake):
    """-V(D, G) (Eq. 1.1), the loss D minimizes: -E log D(x) - E log(1 - D(G(z))).
    In logits: log sigmoid(l) = -softplus(-l) and log(1 - sigmoid(l)) = -softplus(l), exact and stable."""
    return F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()


def generator_loss(logit_fake, kind):
    """The loss G minimizes, from D's logits l on a batch of fakes.
    minimax (Eq. 1.7):        E log(1 - D(G(z))) = -E softplus(l);  d/dl = -D(G(z)),     tiny when D(G(z)) -> 0
    nonsaturating (Eq. 1.8): -E log D(G(z))     =  E softplus(-l);  d/dl = -(1 - D(G(z))), about -1 there"""
    if kind == "minimax":
        return -F.softplus(logit_fake).mean()
    return F.softplus(-logit_fake).mean()


class GAN(nn.Module):
    """The two players. G and D may be any modules (the tests use 1-D ones): G maps (n, latent_dim) noise to
    samples, D maps samples to (n, 1) logits."""

    def __init__(self, G, D, latent_dim, g_loss="nonsaturating"):
        super().__init__()
        self.G, self.D, self.latent_dim, self.kind = G, D, latent_dim, g_loss

    def noise(self, n):  # (n, latent_dim), z ~ N(0, I)
        return torch.randn(n, self.latent_dim, device=next(self.G.parameters()).device)

    def d_loss(self, x, x_fake):
        """Algorithm 1, inner step: D ascends V on a batch of data x and of fakes G(z) (held fixed).
        Returns the loss and the batch mean of D(x), for the log."""
        logit_real = self.D(x)  # (B, 1)
        logit_fake = self.D(x_fake.detach())  # (B, 1); detach: this step updates D only
        return discriminator_loss(logit_real, logit_fake), torch.sigmoid(logit_real).mean().detach()

    def g_loss(self, x_fake):
        """Algorithm 1, outer step: G descends its loss through D's current judgment of fresh fakes.
        Returns the loss and the batch mean of D(G(z)), for the log."""
        logit_fake = self.D(x_fake)  # (B, 1)
        return generator_loss(logit_fake, self.kind), torch.sigmoid(logit_fake).mean().detach()

    @torch.no_grad()
    def sample(self, n):
        """n images from p_g, pixels mapped from [-1, 1] back to [0, 1]: (n, 1, 28, 28)."""
        return (self.G(self.noise(n)) + 1).div(2).clamp(0, 1)


def grad_norm(module):
    """Euclidean norm of all of a module's parameter gradients, as one vector."""
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))


def gradient_probe(gan, n=256):
    """Both generator losses on the same n fakes and the same D: the norm of G's gradient under each.
    Their ratio is the lesson of Eq. 1.9: minimax weights each sample's gradient by D(G(z)), the
    non-saturating loss by 1 - D(G(z)). Leaves no gradient behind."""
    logit_fake = gan.D(gan.G(gan.noise(n)))  # (n, 1), one forward pass (one dropout mask) for both losses
    norms = {}
    for kind in ("minimax", "nonsaturating"):
        grads = torch.autograd.grad(generator_loss(logit_fake, kind), list(gan.G.parameters()), retain_graph=True)
        norms[kind] = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    return norms


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1], G's tanh range

    gan = GAN(Generator(cfg.latent_dim, cfg.hidden), Discriminator(cfg.hidden, cfg.dropout), cfg.latent_dim, cfg.g_loss).to(device)
    opt_G = torch.optim.Adam(gan.G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_D = torch.optim.Adam(gan.D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        gan.G.load_state_dict(ckpt["model"]["G"])
        gan.D.load_state_dict(ckpt["model"]["D"])
        opt_G.load_state_dict(ckpt["optimizer"]["G"])
        opt_D.load_state_dict(ckpt["optimizer"]["D"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {"G": gan.G.state_dict(), "D": gan.D.state_dict()},
                                          "optimizer": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
                                          "config": asdict(cfg), "step": step})

    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    history, window = [], torch.zeros(5, device=device)  # window sums of loss_D, loss_G, D(x), D(G(z)), |grad_G|
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc=f"gan ({cfg.g_loss})")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. D step: a batch of data and a batch of fakes; D ascends V (Eq. 1.1)
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            with autocast:
                loss_d, d_real = gan.d_loss(x, gan.G(gan.noise(cfg.batch_size)))
            opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_D.step()
            # 2. G step: fresh fakes, judged by the updated D; G descends Eq. 1.7 or Eq. 1.8
            with autocast:
                loss_g, d_fake = gan.g_loss(gan.G(gan.noise(cfg.batch_size)))
            if not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
                raise SystemExit(f"error: loss is {loss_d.item()} (D), {loss_g.item()} (G) at step {step}; "
                                 f"the last good checkpoint is {out / 'ckpt.pt'}")
            opt_G.zero_grad(set_to_none=True)
            loss_g.backward()  # also leaves gradients in D, cleared before D's next step
            norm_g = grad_norm(gan.G)  # the signal G receives: small under minimax when D(G(z)) ~ 0
            opt_G.step()
            step += 1
            window += torch.stack([loss_d.detach(), loss_g.detach(), d_real, d_fake, norm_g]).float()
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(D_real=f"{d_real.item():.2f}", D_fake=f"{d_fake.item():.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = (step - 1) % cfg.log_every + 1
                stats = dict(zip(["loss_d", "loss_g", "d_real", "d_fake", "grad_g"], (window / n).tolist()), step=step)
                probe = gradient_probe(gan)
                stats.update(probe_minimax=probe["minimax"], probe_nonsaturating=probe["nonsaturating"])
                history.append(stats)
                window.zero_()
                bar.write(f"step {step}: loss D {stats['loss_d']:.3f}, loss G {stats['loss_g']:.3f}, D(x) {stats['d_real']:.3f}, "
                          f"D(G(z)) {stats['d_fake']:.4f}, |grad G| {stats['grad_g']:.3f} (means over {n} steps); "
                          f"same batch, both losses: |grad G| minimax {probe['minimax']:.4f}, "
                          f"non-saturating {probe['nonsaturating']:.4f}")
                checkpoint()
                save_grid(gan.sample(64), out / "samples.png", nrow=8)
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    if not cfg.sample_only:
        print(f"{cfg.g_loss} generator loss: {step} steps in {time.time() - t0:.0f} s")
        checkpoint()

    samples = gan.sample(cfg.num_samples)  # (N, 1, 28, 28) in [0, 1]
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}; score them with "
          f"python 02_gans/metrics.py {out / 'samples.npz'}")
    return {"step": step, "history": history, **(history[-1] if history else {})}


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
