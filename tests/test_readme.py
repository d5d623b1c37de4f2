"""The README and docs/ say what the code does.

* The quick starts run as printed, and their results equal the unstreamed computation
  (NumPy: `net.forward` / `net.backward`; PyTorch: the plain trunk on the whole image).
* The GPU snippet uses only names that the CPU quick start defines.
* The weight file's URL and SHA-256 sit beside each other, and the hash begins with the eight
  hex digits that torchvision puts in the file name.
* The CAMELYON16 layout printed in the README is the one `make_demo_data` writes and
  `discover` reads.
* Relative links in the markdown files point at files that exist; no file of the repository
  cites a file outside it.
* Every "ours" value of docs/defaults.md is the current default of TrainConfig / ModelConfig,
  and every training-relevant field has a row; the README's recipe paragraph states the
  current defaults.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import fnmatch
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import make_tiny_camelyon
from torch_impl.models.streaming_clam import ModelConfig
from torch_impl.pipeline.config import TrainConfig
from torch_impl.slides import discover
from torch_impl.streaming import to_model_input

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEFAULTS = (ROOT / "docs" / "defaults.md").read_text()

WEIGHTS_URL = "https://download.pytorch.org/models/resnet34-b627a593.pth"


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def block_with(text: str, language: str, needle: str) -> str:
    found = [b for b in code_blocks(text, language) if needle in b]
    assert len(found) == 1, f"expected one ```{language} block of the README with {needle!r}, found {len(found)}"
    return found[0]


def run_block(code: str) -> tuple[dict, str]:
    """Execute a README block in a fresh namespace; (its namespace, what it printed)."""
    namespace: dict = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace, out.getvalue()


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- quick starts
def test_numpy_quick_start_equals_the_full_computation():
    ns, _ = run_block(block_with(README, "python", "from reference"))
    net, x, y = ns["net"], ns["x"], ns["y"]
    plan = ns["stream_forward"].__globals__["plan_for"](net, x, 400)
    assert len(plan) == 4  # the comment's 2 x 2 tiles
    assert rel_diff(y, net.forward(x)) < 1e-12
    grad_x, grads = net.backward(x, np.ones_like(y))
    assert rel_diff(ns["grad_x"], grad_x) < 1e-10
    assert ns["grads"].keys() == grads.keys() and grads
    assert max(rel_diff(ns["grads"][k], grads[k]) for k in grads) < 1e-10


@pytest.fixture(scope="module")
def torch_quick_start():
    torch.set_num_threads(1)
    return run_block(block_with(README, "python", "StreamingTrunk(trunk, tile_size=1600)"))


def test_torch_quick_start_streams_and_gives_the_plain_gradients(torch_quick_start):
    ns, printed = torch_quick_start
    trunk, streamed, head = ns["trunk"], ns["streamed"], ns["head"]
    assert len(streamed.plan((2048, 2048))) == 4 and printed.startswith("4 tiles;")
    params = [p for p in trunk.parameters() if p.requires_grad]
    assert params and all(p.grad is not None for p in params)
    assert f"{len(params)} trunk gradients" in printed
    streamed_grads = [p.grad.clone() for p in params]

    # oracle: the same trunk on the whole normalised image, with autograd keeping everything
    x = to_model_input(torch.from_numpy(ns["slide"]))[None]  # (1, 3, 2048, 2048)
    trunk.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    plain = trunk(x)
    assert plain.shape == ns["features"].shape == (1, 64, 64, 64)
    assert rel_diff(ns["features"].detach(), plain.detach()) < 1e-5
    head.loss(head(plain, ns["mask"]), ns["label"]).backward()
    for p, g in zip(params, streamed_grads):
        assert rel_diff(g, p.grad) < 1e-3


def test_gpu_snippet_uses_only_names_of_the_cpu_quick_start(torch_quick_start):
    ns, _ = torch_quick_start
    code = block_with(README, "python", ".cuda()")
    tree = ast.parse(code)  # a syntax error fails here
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    unknown = loaded - assigned - set(ns) - set(dir(builtins))
    assert not unknown, f"the GPU snippet uses names the CPU quick start does not define: {sorted(unknown)}"
    assert 'weights="resnet34-b627a593.pth"' in code


def test_weights_url_and_sha256_are_given_together():
    block = block_with(README, "bash", WEIGHTS_URL)
    digest = re.search(r"\b([0-9a-f]{64})\s+resnet34-b627a593\.pth\b", block)
    assert digest, "the SHA-256 of resnet34-b627a593.pth belongs next to its URL"
    assert digest[1].startswith("b627a593")  # torchvision names its files after the hash
    assert "sha256sum -c" in block


# ----------------------------------------------------------------------------- CAMELYON16 layout
def test_camelyon_layout_is_what_the_reader_expects(tmp_path):
    block = block_with(README, "text", "CAMELYON16/")
    patterns = [line.strip() for line in block.splitlines()[1:] if line.strip()]
    assert "testing/lesion_annotations/test_*.xml" in patterns
    records = make_tiny_camelyon(tmp_path)
    files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    for pattern in patterns:
        assert any(fnmatch.fnmatch(f, pattern) for f in files), f"the synthetic data set has no {pattern}"
    for f in files:
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f"{f} is missing from the README's layout"
    assert {r.slide_id for r in discover(tmp_path)} == {r.slide_id for r in records}


# ----------------------------------------------------------------------------- links, outside files
#: Folders that are no part of the repository's content (environments, caches, outputs).
SKIP_DIRS = {"__pycache__", "build", "runs", "demo_data", "demo_run"}


def repository_files(suffixes: set[str]) -> list[Path]:
    """Files of the working tree with these suffixes, outside hidden folders and outputs."""
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and path.suffix in suffixes:
            found.append(path)
    return sorted(found)


def markdown_files() -> list[Path]:
    return repository_files({".md"})


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(path):
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


#: What citing a file outside the repository looks like (built in pieces so that this file does
#: not match itself): the design notes, a sibling folder of the checkout, absolute home paths.
OUTSIDE = re.compile("|".join(["DESIGN" + r"\.md", r"\.\./\.\./" + "shared", "/" + "work/", "/" + "home/", "/" + "Users/"]))


def test_no_file_cites_files_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}: {m[0]!r}" for p in repository_files({".md", ".py", ".ipynb", ".sh", ".toml", ".txt", ".cfg"})
                 for m in [OUTSIDE.search(p.read_text(errors="replace"))] if m]
    assert not offenders, "files that read or cite files outside the repository:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------- docs/defaults.md
#: Fields that are no training recipe (where data and outputs go, bookkeeping, hardware).
NOT_RECIPE = {
    "TrainConfig": {"data_dir", "out_dir", "model", "splits_csv", "skip_bad_slides", "max_slides_per_epoch",
                    "seed", "calibrate_bn", "device", "checkpoint_every", "progress"},
    "ModelConfig": {"channels_last"},
}
CLASSES = {"TrainConfig": TrainConfig, "ModelConfig": ModelConfig}


def documented_defaults() -> dict[tuple[str, str], object]:
    """{(class, field): value} from the rows of docs/defaults.md that name a config field."""
    table = {}
    for line in DEFAULTS.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        field = re.match(r"`(TrainConfig|ModelConfig)\.(\w+)`(?:\s*=\s*`([^`]+)`)?$", cells[2])
        if not field:
            continue
        literal = field[3] if field[3] is not None else re.match(r"`([^`]+)`", cells[1])[1]
        table[field[1], field[2]] = ast.literal_eval(literal)
    return table


def test_defaults_table_shows_the_current_defaults():
    table = documented_defaults()
    assert len(table) >= 30
    for (cls, name), value in table.items():
        fields = {f.name: f for f in dataclasses.fields(CLASSES[cls])}
        assert name in fields, f"docs/defaults.md names {cls}.{name}, which does not exist"
        default = getattr(CLASSES[cls](), name)
        assert type(value) is type(default) and value == default, (
            f"docs/defaults.md says {cls}.{name} = {value!r}, the code's default is {default!r}: update the row")


def test_defaults_table_covers_every_recipe_field():
    table = documented_defaults()
    for cls, klass in CLASSES.items():
        missing = [f.name for f in dataclasses.fields(klass) if f.name not in NOT_RECIPE[cls] and (cls, f.name) not in table]
        assert not missing, f"docs/defaults.md has no row for {cls} field(s) {missing}"


def test_readme_recipe_states_the_current_defaults():
    train, model = TrainConfig(), ModelConfig()
    recipe = " ".join(README[README.index("The defaults follow the"):].split()[:200])  # the paragraph, one line
    stated = {
        "lr": float(re.search(r"Adam at ([\d.e-]+)", recipe)[1]),
        "weight_decay": float(re.search(r"weight decay ([\d.e-]+)", recipe)[1]),
        "epochs": int(re.search(r"(\d+) epochs of which", recipe)[1]),
        "head_only_epochs": int(re.search(r"the first (\d+) train the head only", recipe)[1]),
        "trunk_lr_factor": float(re.search(r"trunk_lr_factor`, by default ([\d.]+)", recipe)[1]),
        "mpp": float(re.search(r"([\d.]+) µm/px", recipe)[1]),
        "max_size": int(re.search(r"at most (\d+) px per side", recipe)[1]),
    }
    for name, value in stated.items():
        assert value == getattr(train, name), f"README says {name} {value}, the default is {getattr(train, name)}"
    assert f"{model.pool_size}x{model.pool_size} {model.pool} pool" in recipe and model.head == "sb"
