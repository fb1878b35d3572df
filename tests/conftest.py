"""Shared test helpers: load a script by path, and a tiny MNIST written in the real IDX format."""

import gzip
import importlib.util
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath, fresh=False):
    """Import a course script by its path from the repository root, e.g.
    load_script("01_autoencoders/vae.py"). Folder names start with digits, so plain `import` cannot.
    The module is registered in sys.modules (dataclasses and inspect need that) and cached."""
    path = ROOT / relpath
    name = "course_" + relpath.replace("/", "_").removesuffix(".py")
    if name in sys.modules and not fresh:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_idx(path, array, magic, compress):
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def digit_images(n, seed):
    """n digit-like 28 x 28 uint8 images (the label drawn in PIL's default font at a random place,
    size and stroke) and their labels: enough structure for a smoke run to exercise real code."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        canvas = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=int(rng.integers(16, 24)))
        draw.text((int(rng.integers(4, 12)), int(rng.integers(0, 6))), str(label), fill=255, font=font,
                  stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
        images[i] = np.asarray(canvas)
    return images, labels


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data folder holding mnist/ with 400 training and 200 test digit-like images. The training
    files are gzipped and the test files raw, so both of load_mnist's paths run."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "mnist"
    folder.mkdir()
    for prefix, n, seed, compress in (("train", 400, 0, True), ("t10k", 200, 1, False)):
        images, labels = digit_images(n, seed)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, compress)
    return root


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST for learning checks: $GENAI_DATA_DIR, else ./data (downloaded on first use)."""
    return os.environ.get("GENAI_DATA_DIR", str(ROOT / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: learning checks on real data (run with pytest -m slow)")


@pytest.fixture(scope="session")
def short_classifier(mnist_dir, tmp_path_factory):
    """A shortened metrics.py classifier (300 steps, 16 channels, test accuracy about 0.944), trained
    once per session for the learning checks: the full one takes minutes and is not in a clean
    checkout. Returns (metrics module, model). Score samples with score_samples below."""
    metrics = load_script("02_gans/metrics.py")
    cfg = metrics.Config(data_dir=mnist_dir, out_dir=str(tmp_path_factory.mktemp("classifier")), steps=300, channels=16)
    return metrics, metrics.train_classifier(cfg)


def score_samples(short_classifier, mnist_dir, images, num_reference=2000):
    """FID, class histogram and confident fraction of uint8 (N, 1, 28, 28) images against the first
    num_reference MNIST test digits, with the short classifier. Returns a dict like metrics.evaluate."""
    import torch
    metrics, model = short_classifier
    x_ref = metrics.load_mnist(mnist_dir, train=False)[0][:num_reference].unsqueeze(1)
    f_ref, _ = metrics.embed(model, x_ref)
    f_gen, probs = metrics.embed(model, torch.as_tensor(images))
    ok, confident, histogram = metrics.recognizable(probs)
    return {"fid": metrics.frechet_distance(f_gen, f_ref), "confident": confident, "histogram": histogram,
            "recognizable": ok, "classes": probs.argmax(1)}
