"""dvc.yaml is the contract: each stage lists its own script and exactly the library rooms (subpackages) its command
imports, however indirectly, so a code change re-runs the stages it can affect and no other."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PROJECT_PACKAGES = ("stages", "finetune")


def module_file(module: str) -> Path | None:
    """The file of a project module, or None when `module` names something inside one (a function, a class)."""
    path = REPO / module.replace(".", "/")
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def project_imports(module: str) -> set[str]:
    """Project modules imported by `module`, anywhere in the file (heavy imports are deferred into functions)."""
    tree = ast.parse(module_file(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_PACKAGES:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if module_file(submodule) else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] in PROJECT_PACKAGES)
    return {name for name in found if module_file(name) and not name.endswith("__init__")}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(project_imports(current))
    return seen


def room(module: str) -> str:
    """What dvc.yaml lists for a module: a stage script or top-level library module as a file, else its subpackage."""
    parts = module.split(".")
    if len(parts) <= 2:
        return "/".join(parts) + ".py"
    return "/".join(parts[:2])


def stage_template(name: str) -> dict:
    return STAGES[name].get("do", STAGES[name])  # a foreach stage: the template every instance is made from


def entry_module(name: str) -> str:
    command = stage_template(name)["cmd"]
    assert command.startswith("python -m stages."), f"stage {name}: unexpected command {command!r}"
    return command.split()[2]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_exactly_the_imported_rooms(name):
    needed = {room(module) for module in closure(entry_module(name))}
    listed = {dep for dep in stage_template(name).get("deps", []) if dep.split("/")[0] in PROJECT_PACKAGES}
    assert not needed - listed, f"stage {name} imports {sorted(needed - listed)}, which dvc.yaml does not list"
    assert not listed - needed, f"stage {name} lists {sorted(listed - needed)} under deps but never imports them"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_imports_another_stage(name):
    entry = entry_module(name)
    others = sorted(module for module in closure(entry) if module.startswith("stages.") and module != entry)
    assert not others, f"{entry} imports the stage scripts {others}"


def all_modules() -> list[str]:
    files = [*(REPO / "finetune").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    return sorted(".".join(path.relative_to(REPO).with_suffix("").parts) for path in files if path.stem != "__init__")


def test_no_import_cycle():
    graph = {module: project_imports(module) for module in all_modules()}
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            cycle = on_path[on_path.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        on_path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_stages_holds_only_what_dvc_runs():
    run = {entry_module(name) for name in STAGES}
    scripts = {module for module in all_modules() if module.startswith("stages.")}
    assert scripts == run, f"stages/ holds {sorted(scripts - run)}, which no dvc.yaml stage runs"
