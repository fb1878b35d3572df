"""Repository-wide checks, parametrized over every script that exists, so a new folder is covered
with no edit here: the house style's contract for a script, and that every link and figure resolves."""

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported first, so the import test times the script alone)

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "out", "data", "__pycache__", ".pytest_cache", "node_modules", ".venv"}
SCRIPTS = sorted(p for p in ROOT.glob("[0-9][0-9]_*/*.py"))
MARKDOWN = sorted(p for p in ROOT.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))
SVGS = sorted((ROOT / "images").rglob("*.svg"))


def rel(path):
    return path.relative_to(ROOT).as_posix()


def import_fresh(path):
    """Import a script under a name of its own (not load_script's), so other tests are untouched."""
    name = "repo_check_" + rel(path).replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def snapshot():
    """Every file under the repository (and its modification time), caches aside."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", "__pycache__", ".pytest_cache"}]
        for n in names:
            p = os.path.join(folder, n)
            files[p] = os.stat(p).st_mtime_ns
    return files


def cpu_recipe(path):
    """The docstring's `CPU recipe: python <path> <flags>` line and the line after it."""
    doc = import_fresh(path).__doc__ or ""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("CPU recipe: "):
            return line, (lines[i + 1] if i + 1 < len(lines) else "")
    return None, None


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_docstring_has_cpu_recipe(path):
    line, measured = cpu_recipe(path)
    assert line is not None, f"{rel(path)}: the docstring needs a line starting 'CPU recipe: '"
    words = shlex.split(line.removeprefix("CPU recipe: "))
    assert words[:2] == ["python", rel(path)], f"the recipe must run `python {rel(path)} ...`, got {line!r}"
    for flag in ("--out-dir", "--device", "--num-samples"):
        assert flag not in words, f"the CPU recipe should not set {flag}"
    assert measured.strip(), "the line after the CPU recipe gives its measured time and result"
    module = import_fresh(path)
    cfg = module.parse_config(module.Config, words[2:])  # every flag of the recipe exists
    assert dataclasses.is_dataclass(cfg)


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_config_and_main(path):
    module = import_fresh(path)
    assert dataclasses.is_dataclass(module.Config), "a script defines `@dataclass class Config`"
    names = {f.name for f in dataclasses.fields(module.Config)}
    assert {"seed", "device", "out_dir"} <= names
    assert callable(module.main)


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_import_is_quiet_and_fast(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot()
    start = time.perf_counter()
    import_fresh(path)
    elapsed = time.perf_counter() - start
    assert snapshot() == before and not any(tmp_path.iterdir()), "importing a script must write no file"
    assert elapsed < 0.5, f"importing {rel(path)} took {elapsed:.2f} s (do the work in main(), not at import)"


@pytest.fixture(scope="module")
def help_runs():
    """`python <script> --help` for every script, all started at once (each imports torch)."""
    procs = {p: subprocess.Popen([sys.executable, str(p), "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for p in SCRIPTS}
    return {p: (proc.wait(timeout=120), *proc.communicate()) for p, proc in procs.items()}


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_help_exits_zero(path, help_runs):
    code, out, err = help_runs[path]
    assert code == 0, err
    assert "--steps" in out or "--seed" in out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:href|src)=\"([^\"]+)\"")


def links(md):
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.DOTALL)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target):  # skip http:, mailto:, #anchors
            yield target


@pytest.mark.parametrize("md", MARKDOWN, ids=rel)
def test_markdown_links_resolve(md):
    missing = [t for t in links(md) if not (md.parent / t.split("#")[0]).exists()]
    assert not missing, f"{rel(md)} links to missing files: {missing}"


@pytest.mark.parametrize("svg", SVGS, ids=rel)
def test_svg_parses(svg):
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
