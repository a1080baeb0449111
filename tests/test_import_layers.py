"""The package's layering (docs/architecture.md, "Layers"): every import of a navit_seq module,
at module top or inside a function, goes to a lower layer or stays inside its own part, so no
two parts import each other. A new module must be placed in a layer here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "navit_seq"
# Lowest first. A part is a subpackage (data, tasks, ...) or a top-level module (decode, ...).
LAYERS = (
    {"cli"},  # one-line errors, --help, progress, compilation cache: imports no navit_seq
    {"config_common"},  # the recipes' shared header: imports only ml_collections
    {"config_utils", "sharding", "cpu_runtime", "kernels"},
    {"data"},
    {"tasks", "evaluation"},
    {"pipeline", "models", "losses"},
    {"decode"},
    {"inference"},
    {"train"},
    {"main"},  # objective_for: the recipe -> objective step the other commands reuse
    {"predict"},
    {"evaluate", "export", "inspect", "quickstart", "plot", "experiment"},
)
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """navit_seq.data.packing -> data; navit_seq.decode -> decode."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def navit_imports(source: str) -> list[str]:
    """Every navit_seq module an import statement names (`from navit_seq import x` -> x too)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "navit_seq":
                names += [f"navit_seq.{alias.name}" for alias in node.names]
    return [name for name in names if name.startswith("navit_seq.")]


def forbidden_imports(sources: dict[str, str]) -> list[str]:
    """'importer -> imported (why)' for each import that breaks the layering."""
    problems = []
    for module, source in sorted(sources.items()):
        if module == "navit_seq":
            continue
        for imported in navit_imports(source):
            here, there = part_of(module), part_of(imported)
            if here == there:
                continue
            unplaced = [p for p in (here, there) if p not in LAYER_OF]
            if unplaced:
                problems.append(f"{module} -> {imported} ({unplaced} in no layer of LAYERS)")
            elif LAYER_OF[there] >= LAYER_OF[here]:
                problems.append(f"{module} -> {imported} (layer {LAYER_OF[there]} is not "
                                f"below {here}'s layer {LAYER_OF[here]})")  # fmt: skip
    return problems


def package_sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in PACKAGE.rglob("*.py")}


def test_every_import_goes_down_the_layers():
    assert forbidden_imports(package_sources()) == []


@pytest.mark.parametrize(
    "module, line",
    [
        ("navit_seq.data.pipeline_helper", "from navit_seq.tasks import keypoints"),  # upward
        ("navit_seq.inference", "    from navit_seq.train import sequence"),  # in a function
        ("navit_seq.tasks.detection", "import navit_seq.pipeline"),  # upward
        ("navit_seq.models.new", "from navit_seq import decode"),
        ("navit_seq.brand_new", "from navit_seq import data"),  # not placed in a layer
    ],
)
def test_a_forbidden_import_is_reported(module, line):
    sources = package_sources()
    sources[module] = f"def load():\n{line}\n" if line.startswith(" ") else line + "\n"
    problems = forbidden_imports(sources)
    assert len(problems) == 1 and problems[0].startswith(module), problems
