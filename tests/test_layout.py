"""The package's shape: no import cycle, the layers of docs/architecture.md, and config files that stay data."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "deme_jax"

# What each part of deme_jax may import from deme_jax (docs/architecture.md draws the same picture).
LAYERS = {
    "cli": {"commands", "train", "xla_cpu"},  # train: multi-host start-up before any command
    "commands": {"deme", "train", "merge", "metrics", "analysis", "interop", "data", "diffusion", "models",
                 "text2image", "randomness", "defaults", "assets", "images"},
    "deme": {"train", "merge", "metrics", "interop", "data", "diffusion", "models", "text2image", "randomness"},
    "interop": {"train", "models", "diffusion", "text2image"},
    "text2image": {"models", "diffusion", "data", "images"},  # data: the latent cache's stream is a BatchStream
    "train": {"data", "diffusion", "models", "randomness", "images"},
    "metrics": {"data", "diffusion", "models", "interop", "text2image", "randomness", "assets", "images"},
    "analysis": {"diffusion", "models"},
    "merge": set(),
    "diffusion": {"images"},
    "data": {"images"},
    "models": set(),
    "defaults": {"assets"},
    "randomness": set(),
    "images": set(),
    "assets": set(),
    "xla_cpu": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every deme_jax module ``path`` imports, anywhere in the file, with the packages Python runs on the way."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:k]) for k in range(2, len(parts) + 1) if parts[0] == "deme_jax"}
    return found


def ancestors(name: str) -> set[str]:
    """The packages Python has already started when ``name`` runs: importing them again is no cycle."""
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts) + 1)}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: (imports_of(path) & set(MODULES)) - ancestors(name) for name, path in MODULES.items()}


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for other in sorted(GRAPH[name]):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other, stack + [other])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    part = name.split(".")[1] if "." in name else None
    if part is None:
        return
    allowed = LAYERS[part] | {part}
    outside = sorted(m for m in GRAPH[name] if m.split(".")[1] not in allowed)
    assert not outside, f"{name} ({part}) imports {outside}; {part} may import {sorted(LAYERS[part])}"


def test_commands_never_import_each_other():
    for name in (m for m in MODULES if m.startswith("deme_jax.commands.")):
        others = {m for m in GRAPH[name] if m.startswith("deme_jax.commands.")}
        assert not others, f"{name} imports {others}: move what they share into a library package"


@pytest.mark.parametrize("config", sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__"))
def test_config_files_import_no_framework(config):
    """A config is plain data: loading it (as the CLI does) pulls in neither JAX nor orbax, clu or TensorFlow."""
    script = (f"import sys; import configs.{config} as c; c.get_config(); "
              "print(sorted(m for m in ('jax', 'orbax', 'clu', 'tensorflow', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
