"""The house keeps its shape: imports between the rooms point one way, every package says what
it holds, and the side that plans and sends stays light.

Read from the source (every import, including those inside functions), so a forbidden import
fails here before anyone runs the code path that makes it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ray_scout"

# What each room may import of ray-scout besides itself. The core's rooms: ``llm`` knows
# tensors and bytes, ``control`` plain numbers (neither knows the other), ``stages`` runs a
# request with both, ``evaluation`` scores the stages; ``net`` and ``transport`` stand apart.
MAY_IMPORT = {
    "ray_scout.core.modes": set(),
    "ray_scout.core.control": {"ray_scout.core.modes"},
    "ray_scout.core.llm": {"ray_scout.core.modes", "ray_scout.provenance"},
    "ray_scout.core.stages": {"ray_scout.core.modes", "ray_scout.core.llm",
                              "ray_scout.core.control"},
    "ray_scout.core.evaluation": {"ray_scout.core.modes", "ray_scout.core.llm",
                                  "ray_scout.core.control", "ray_scout.core.stages"},
    "ray_scout.net": set(),
    "ray_scout.transport": set(),
}
# Third-party packages a room must not import at all: the core runs without Ray or root
# (pyroute2), and the decision side without a model.
NEVER = {
    "ray_scout.core": {"ray", "pyroute2"},
    "ray_scout.core.control": {"torch", "transformers", "triton"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a file (``from a import b``: ``a.b``,
    which lies inside ``a``'s room whether ``b`` is a module or a name)."""
    tree = ast.parse(source if source is not None else path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[:len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def room_of(module: str) -> str | None:
    """The longest room of ``MAY_IMPORT`` or ``NEVER`` that holds ``module``."""
    rooms = [r for r in (*MAY_IMPORT, *NEVER) if module == r or module.startswith(r + ".")]
    return max(rooms, key=len, default=None)


def _inside(module: str, rooms: set[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def forbidden_imports(path: Path, source: str | None = None) -> list[str]:
    """What ``path`` imports against the rules above, one line each."""
    module = module_name(path)
    room = room_of(module)
    problems = []
    for line, name in imported(path, source):
        where = f"{path.relative_to(REPO)}:{line} imports {name}"
        top = name.split(".")[0]
        for never_room, packages in NEVER.items():
            if _inside(module, {never_room}) and top in packages:
                problems.append(f"{where}: {never_room} never imports {top}")
        if room in MAY_IMPORT and top == "ray_scout" and not _inside(name, {room}):
            if name == "ray_scout" or not _inside(name, MAY_IMPORT[room]):
                problems.append(f"{where}: {room} may import only "
                                f"{sorted(MAY_IMPORT[room]) or 'itself'}")
    return problems


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_of_the_rules_exists():
    for room in (*MAY_IMPORT, *NEVER, *(m for rooms in MAY_IMPORT.values() for m in rooms)):
        path = REPO / room.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), room


def test_imports_between_rooms_point_one_way():
    problems = [p for path in SOURCES for p in forbidden_imports(path)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("file, source", [
    ("ray_scout/core/control/policy.py", "from ray_scout.core.llm.wire import payload_size_bytes"),
    ("ray_scout/core/control/policy.py", "def f():\n    from ..evaluation import metrics"),
    ("ray_scout/core/control/policy.py", "import torch"),
    ("ray_scout/core/llm/wire.py", "from ray_scout.core.control.policy import LatencyModel"),
    ("ray_scout/core/stages/full.py", "from ray_scout.core.evaluation.metrics import f1"),
    ("ray_scout/core/evaluation/metrics.py", "from ray_scout.actors.edge import EdgeAgent"),
    ("ray_scout/core/modes.py", "import ray_scout.core.llm"),
    ("ray_scout/core/llm/models.py", "import ray"),
    ("ray_scout/net/shaping.py", "from ray_scout.core.control.capacity import CapacityTrace"),
    ("ray_scout/transport/client.py", "from ray_scout import core"),
])
def test_a_forbidden_import_is_caught(file, source):
    assert forbidden_imports(REPO / file, source)


def test_an_allowed_import_passes():
    assert forbidden_imports(REPO / "ray_scout/core/evaluation/quality.py",
                             "from ..stages.full import EdgeStage\nimport numpy") == []


def test_transport_uses_the_standard_library_only():
    """Its own docstring's promise: a data plane anyone can run without the project's stack."""
    outside = [f"{path.relative_to(REPO)}:{line} {name}"
               for path in sorted((PACKAGE / "transport").rglob("*.py"))
               for line, name in imported(path)
               if name.split(".")[0] not in sys.stdlib_module_names | {"ray_scout"}]
    assert outside == []


def test_every_package_opens_with_what_it_holds():
    """Each package's ``__init__`` states its division of labour in a few lines."""
    thin = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if len(doc.split()) < 25:
            thin.append(str(init.relative_to(REPO)))
    assert thin == []


def test_the_planning_side_loads_no_model_stack():
    """A profiled agent, the policy and the allocator import no torch: hundreds of agents on
    one host stay light (``core.stages.request`` and ``profiled`` import torch only when
    type checking)."""
    modules = ["ray_scout.core.control.allocation", "ray_scout.core.control.capacity",
               "ray_scout.core.control.estimators", "ray_scout.core.control.policy",
               "ray_scout.core.control.queueing", "ray_scout.core.stages.profiled",
               "ray_scout.actors.edge", "ray_scout.actors.cloud"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
