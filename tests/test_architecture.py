"""The architecture CONTRIBUTING.md describes, checked on the source: the layers read top to bottom, the product
holds no tooling and loads no file by path, and one module builds decoders from checkpoints."""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dynadiff"
# The exca configs of dynadiff/config.py run their pipelines from their methods, imported at call time: their
# module is part of every cache key (folder names such as dynadiff.config.NsdDatasetConfig.run_windows,1 in the
# users' caches), so they stay in one module, and these calls are the one sanctioned way up.
SANCTIONED = {("dynadiff.config", target) for target in (
    "dynadiff.data", "dynadiff.evaluation", "dynadiff.timecourse", "dynadiff.training")}
# where a room's modules may be imported from: the commands (and the demo, which runs them) by nothing else
COMMAND_ROOMS = {"dynadiff.commands", "dynadiff.demo"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported dynadiff module or name, at run time) of each import in ``path`` (``TYPE_CHECKING`` blocks are
    not run)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynadiff"):
            out += [(f"{node.module}.{a.name}", id(node) not in typing_only) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) not in typing_only) for a in node.names if a.name.startswith("dynadiff")]
    return out


def _room(module: str) -> str:
    """``dynadiff.data.dataset`` -> ``dynadiff.data``: a folder of the package, or a module at its top."""
    return ".".join(module.split(".")[:2])


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_circle_between_rooms():
    """Rooms (dynadiff/'s folders and top-level modules) import each other without a circle, at run time, but for
    the sanctioned calls of dynadiff/config.py's exca methods into their pipelines."""
    modules = _modules()
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        for imported, at_run_time in _imports(path):
            target = _resolve(imported, modules)
            if at_run_time and target is not None and _room(target) != _room(name) and target != "dynadiff":
                if (_room(name), _room(target)) not in SANCTIONED:
                    edges[_room(name)].add(_room(target))
    cycles = []
    for start in list(edges):  # a room that reaches itself again
        seen, todo = set(), [(start, (start,))]
        while todo:
            room, path = todo.pop()
            for nxt in edges.get(room, ()):
                if nxt == start:
                    cycles.append(" -> ".join((*path, nxt)))
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, (*path, nxt)))
    assert not cycles, "import circles between rooms:\n" + "\n".join(sorted(set(cycles)))


def test_the_commands_are_imported_by_nothing_below_them():
    modules = _modules()
    offenders = [f"{name} imports {imported}" for name, path in modules.items() if _room(name) not in COMMAND_ROOMS
                 for imported, _ in _imports(path) if _room(_resolve(imported, modules) or "") in COMMAND_ROOMS]
    assert not offenders, offenders


def test_the_product_holds_no_tooling_and_loads_no_file_by_path():
    """Test, benchmark and browser tooling lives in tests/, benchmarks/ and scripts/; nothing under dynadiff/
    imports it, nor executes a Python file by its path."""
    forbidden = re.compile(r"spec_from_file_location|SourceFileLoader|\brunpy\b|\bexec\(|\bexecfile\b")
    tooling = re.compile(r"^\s*(from|import)\s+(tests|benchmarks|scripts|local_slurm|real_size|browser|selenium)\b",
                         re.M)
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not forbidden.search(text), f"{path.relative_to(REPO)} loads code by path"
        assert not tooling.search(text), f"{path.relative_to(REPO)} imports test or benchmark tooling"
    assert not (PACKAGE / "slurm_local.py").exists() and not (PACKAGE / "models" / "realsize.py").exists()


def test_one_module_builds_decoders_from_checkpoints():
    """Only dynadiff/decoder.py turns a checkpoint into a model that draws images (training's --resume loads its
    own state into the model it trains, and --init-from a pretrained model's weights)."""
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if re.search(r"\bload_checkpoint\(", p.read_text()) and p.name != "io.py")
    assert callers == ["decoder.py", "training/checkpoints.py"], callers
    # what a checkpoint records is read by CheckpointInfo; training reads its own resume state (state.safetensors)
    readers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if re.search(r"\bread_metadata\(", p.read_text()) and p.parent.name != "checkpoint")
    assert readers == ["decoder.py", "training/checkpoints.py", "training/checks.py"], readers
