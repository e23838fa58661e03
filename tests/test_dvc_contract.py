"""dvc.yaml is the contract: every stage lists each project module its command imports, however indirectly, so a
code change re-runs exactly the stages it can affect."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def project_imports(module: str) -> set[str]:
    """`stages.x` modules imported by `module`, anywhere in the file (stages defer heavy imports into functions)."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            names = [node.module] if node.module != "stages" else [f"stages.{alias.name}" for alias in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("stages."))
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(project_imports(current))
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_module_is_a_dependency(name):
    stage = STAGES[name].get("do", STAGES[name])  # a foreach stage: the template every instance is made from
    command = stage["cmd"]
    assert command.startswith("python -m stages."), f"stage {name}: unexpected command {command!r}"
    entry = command.split()[2]
    needed = {module.replace(".", "/") + ".py" for module in closure(entry)}
    listed = set(stage.get("deps", []))
    missing = sorted(needed - listed)
    assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them under deps"
