"""
metrics.py: the course's evaluation. Every image model is scored the same way, by one small MNIST
classifier trained here once, deterministically.

Papers: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium" (FID), 2017, arXiv 1706.08500; Salimans et al., "Improved Techniques for Training
GANs" (Inception score), 2016, arXiv 1606.03498; Kynkaanniemi et al., "Improved Precision and
Recall Metric for Assessing Generative Models", 2019, arXiv 1904.06991.

The idea: embed real test digits and generated samples with the classifier's penultimate layer
(128 features), fit a Gaussian to each and take the Frechet distance between them (FID); ask the
classifier what each sample is (Inception-style score, class histogram, fraction confident); and
measure how much of the sample set lies on the data's k-NN manifold (precision) and how much of
the data lies on the samples' (recall).

    FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)      (README Eq. M.1, M.2)
    IS  = exp( E_x KL( p(y|x) || p(y) ) ),  p(y) = E_x p(y|x)          (README Eq. M.3)
    precision = mean over samples of [inside some real point's k-NN ball]   (Eq. M.4)
"Recognizable digits" (STYLE.md): >= 80 % of samples with confidence > 0.9, every class >= 5 %.

Run:   python 02_gans/metrics.py out/vae/samples.npz     (trains the classifier on first use)
CPU recipe: python 02_gans/metrics.py --real 10000
Measured on a 2-core CPU: classifier 3000 steps in 214 s (once, then cached), test accuracy 0.9907,
checksum 93ef6bc3927689b0; then 10 s: FID 4.62, IS 9.74, precision 0.866, recall 0.864 (README table).
Writes out/metrics/classifier.pt (reused while its training settings match).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    samples: str = ""  # path to a samples.npz (also accepted as the first, positional argument)
    real: int = 0  # instead of a samples file, score this many training digits: the real-vs-real floor
    seed: int = 0  # random seed of the classifier's initialization and batches
    device: str = "cpu"  # cpu keeps the classifier bit-for-bit reproducible; auto | cuda | mps also work
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/metrics"  # the classifier is cached here as classifier.pt
    steps: int = 3000  # classifier training steps (learning rate decays linearly to 0)
    batch_size: int = 128  # images per classifier training step
    lr: float = 1e-3  # Adam learning rate of the classifier
    channels: int = 32  # channels of the classifier's first convolution (the second has twice as many)
    num_reference: int = 10000  # MNIST test digits used as the reference set (all 10000 by default)
    k: int = 3  # neighbours defining the k-NN manifolds of precision and recall

    def __post_init__(self):
        if self.k < 1 or self.num_reference <= self.k or self.real < 0:
            raise ValueError("need k >= 1, --num-reference > k and --real >= 0")


# --- Model ---


class Classifier(nn.Module):
    """Two conv-ReLU-pool blocks, a 128-unit feature layer, 10 logits."""

    def __init__(self, channels=32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),             # (B, c, 14, 14)
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2c, 7, 7)
        )
        self.fc = nn.Linear(2 * channels * 49, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x):  # (B, 1, 28, 28) in [0, 1] -> (B, 128): the embedding FID uses
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):  # -> (B, 10) logits
        return self.head(self.features(x))


def weights_checksum(model):
    """First 16 hex digits of sha256 over the float32 bytes of the state_dict, in key order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- The method ---


def sqrt_psd(s):
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(s1, s2):
    """tr sqrt(S1 S2) (README Eq. M.2). S1 S2 is not symmetric, but it is similar to the symmetric
    PSD matrix S1^1/2 S2 S1^1/2, so both share eigenvalues; eigvalsh on the symmetric form gives them
    real and non-negative, with no complex round-off that sqrtm of S1 S2 would produce."""
    r = sqrt_psd(s1)
    m = r @ s2 @ r
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(f1, f2):
    """Eq. M.1: Frechet (Wasserstein-2) distance squared between Gaussians fitted to two feature sets
    (N1, D) and (N2, D), in float64."""
    f1, f2 = torch.as_tensor(f1).double(), torch.as_tensor(f2).double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    fid = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt_product(s1, s2)
    return fid.clamp(min=0).item()


def inception_score(probs):
    """Eq. M.3: exp(E_x KL(p(y|x) || p(y))); 1 when every sample looks alike, 10 at most here."""
    probs = torch.as_tensor(probs).double().clamp(min=1e-12)
    p_y = probs.mean(0, keepdim=True)
    return (probs * (probs.log() - p_y.log())).sum(1).mean().exp().item()


def knn_radii(f, k, chunk=1000):
    """Distance from each row of f to its k-th nearest other row (the ball of the k-NN manifold)."""
    radii = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)  # (chunk, N); the point itself is at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def coverage(queries, support, radii, chunk=1000):
    """Fraction of queries inside at least one ball B(support_j, radii_j)."""
    inside = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], support)  # (chunk, M)
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3):
    """Eq. M.4 (Kynkaanniemi et al. 2019): precision = share of fake points on the real manifold,
    recall = share of real points on the fake manifold; each manifold is the union of k-NN balls."""
    real, fake = torch.as_tensor(real).float(), torch.as_tensor(fake).float()
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def recognizable(probs):
    """STYLE.md's rule on (N, 10) class probabilities: >= 80 % of samples with confidence > 0.9,
    and every class the argmax of >= 5 % of samples. Returns (verdict, fraction confident, histogram)."""
    probs = torch.as_tensor(probs)
    confident = (probs.max(1).values > 0.9).double().mean().item()
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    return confident >= 0.8 and bool((histogram >= 0.05).all()), confident, histogram.tolist()


@torch.no_grad()
def embed(model, images, batch_size=1000):
    """uint8 (N, 1, 28, 28) -> features (N, 128) float32 and class probabilities (N, 10) float64."""
    feats, probs = [], []
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float().div(255)
        f = model.features(x)
        feats.append(f.cpu())
        probs.append(model.head(f).double().softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def read_samples(path):
    """images uint8 (N, 1, 28, 28) and labels (N,) or None; a bad file exits with one message."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: no samples file at {path}")
    try:
        data = np.load(path)
        files = set(data.files)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is not a readable .npz file ({e})")
    if "images" not in files:
        raise SystemExit(f"error: {path} has no 'images' array (it has: {sorted(files)}); "
                         f"metrics.py scores MNIST images, uint8 N x 1 x 28 x 28")
    images = data["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (1, 28, 28) or len(images) < 2:
        raise SystemExit(f"error: {path}: 'images' must be uint8 N x 1 x 28 x 28 with N >= 2, "
                         f"got {images.dtype} {images.shape}")
    labels = data["labels"] if "labels" in files else None
    if labels is not None and labels.shape != (len(images),):
        raise SystemExit(f"error: {path}: 'labels' must have shape ({len(images)},), got {labels.shape}")
    return torch.from_numpy(images.copy()), None if labels is None else torch.from_numpy(labels.astype(np.int64))


# --- Training ---


def train_classifier(cfg):
    """Train the classifier once, deterministically (fixed seed, one thread, deterministic
    algorithms), or load it from out_dir/classifier.pt when its training settings match."""
    path = Path(cfg.out_dir) / "classifier.pt"
    settings = {"seed": cfg.seed, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "channels": cfg.channels}
    device = pick_device(cfg.device)
    model = Classifier(cfg.channels)
    if path.exists():
        ckpt = load_checkpoint(path)
        if ckpt["config"] == settings:
            model.load_state_dict(ckpt["model"])
            print(f"classifier: loaded {path}, test accuracy {ckpt['accuracy']:.4f}, "
                  f"weights checksum {weights_checksum(model)}")
            return model.to(device).eval()
        print(f"classifier: {path} was trained with {ckpt['config']}, retraining with {settings}")

    # reproducible across runs: same seed, same batches, one thread, no nondeterministic kernels
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        model = Classifier(cfg.channels)
        x_train, y_train = load_mnist(cfg.data_dir, train=True)
        x_train = x_train.float().div(255).unsqueeze(1)  # (60000, 1, 28, 28)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / cfg.steps)
        t0 = time.time()
        for step in (bar := tqdm(range(cfg.steps), desc="classifier")):
            idx = torch.randint(len(x_train), (cfg.batch_size,), generator=generator)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        model.eval()
        x_test, y_test = load_mnist(cfg.data_dir, train=False)
        _, probs = embed(model, x_test.unsqueeze(1))
        accuracy = (probs.argmax(1) == y_test).double().mean().item()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    save_checkpoint(path, {"model": model.state_dict(), "config": settings, "accuracy": accuracy, "step": cfg.steps})
    print(f"classifier: trained {cfg.steps} steps in {time.time() - t0:.0f} s, test accuracy {accuracy:.4f}, "
          f"weights checksum {weights_checksum(model)}; saved {path}")
    return model.to(device)


def evaluate(cfg, model=None):
    """Every metric of a samples file (or of --real N training digits) against the test set."""
    if cfg.real:
        images = load_mnist(cfg.data_dir, train=True)[0][:cfg.real].unsqueeze(1)
        labels, name = None, f"{min(cfg.real, len(images))} MNIST training digits (real-vs-real floor)"
    elif cfg.samples:
        images, labels = read_samples(cfg.samples)
        name = cfg.samples
    else:
        raise SystemExit("error: give a samples file (python 02_gans/metrics.py out/vae/samples.npz) or --real N")
    model = model or train_classifier(cfg)
    x_ref = load_mnist(cfg.data_dir, train=False)[0][:cfg.num_reference].unsqueeze(1)
    f_ref, _ = embed(model, x_ref)
    f_gen, probs = embed(model, images)
    precision, recall = precision_recall(f_ref, f_gen, cfg.k)
    ok, confident, histogram = recognizable(probs)
    result = {"n": len(images), "n_reference": len(x_ref), "fid": frechet_distance(f_gen, f_ref),
              "inception_score": inception_score(probs), "precision": precision, "recall": recall,
              "confident": confident, "histogram": histogram, "recognizable": ok}
    print(f"{name}: N = {result['n']} against {result['n_reference']} test digits")
    print(f"  FID {result['fid']:.3f}   IS {result['inception_score']:.3f}   "
          f"precision {precision:.3f}   recall {recall:.3f}  (k = {cfg.k})")
    print("  classes  " + " ".join(f"{c}:{h:.3f}" for c, h in enumerate(histogram)))
    print(f"  confident (p > 0.9) {confident:.3f}   recognizable digits: {'yes' if ok else 'no'}")
    if labels is not None:
        result["label_agreement"] = (probs.argmax(1) == labels).double().mean().item()
        print(f"  classifier agrees with the stored labels: {result['label_agreement']:.3f}")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `metrics.py path/samples.npz ...`: the positional form
        argv = ["--samples"] + argv
    cfg = parse_config(Config, argv)
    return evaluate(cfg)


if __name__ == "__main__":
    main()
