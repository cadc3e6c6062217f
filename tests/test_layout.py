"""The house rules that keep the code navigable: imports point one way, `--help` stays light,
model families are capabilities, not strings compared outside `models/`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "streamprune"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_no_library_module_imports_the_cli_or_the_ready_jobs():
    offenders = []
    for path in library_files():
        if path == LIBRARY / "cli.py":
            continue
        for name in imported_modules(path):
            if name == "streamprune.cli" or name == "pipelines" or name.startswith("pipelines."):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_lower_rooms_never_import_commands_or_runtime():
    """cli -> commands -> serve -> runtime -> models / memory / pruning / sources / transport -> types."""
    lower = ["models", "memory", "pruning", "sources", "transport", "encode", "data"]
    offenders = []
    for room in lower:
        for path in sorted((LIBRARY / room).rglob("*.py")):
            for name in imported_modules(path):
                if name.startswith(("streamprune.commands", "streamprune.runtime", "streamprune.bench",
                                    "streamprune.serve")):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    for path in sorted((LIBRARY / "runtime").rglob("*.py")):
        offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in imported_modules(path)
                      if n.startswith(("streamprune.commands", "streamprune.serve"))]
    for path in sorted((LIBRARY / "serve").rglob("*.py")):
        offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in imported_modules(path)
                      if n.startswith("streamprune.commands")]
    assert not offenders, offenders


def test_a_planted_cli_import_is_caught(tmp_path):
    planted = tmp_path / "bad.py"
    planted.write_text("def f():\n    from streamprune.cli import main\n")
    assert "streamprune.cli" in imported_modules(planted)


@pytest.mark.parametrize("argv", [["--help"], ["ask", "--help"], ["live", "--help"], ["bench", "robot", "--help"]])
def test_help_loads_neither_torch_nor_transformers(argv):
    code = ("import sys\nfrom streamprune.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'av') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "usage:" in out and "HEAVY []" in out, out[-500:]


def test_family_names_are_not_compared_outside_models():
    from streamprune.models import FAMILIES

    offenders = []
    for path in library_files():
        if path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in FAMILIES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_library_files_are_of_one_purpose_and_short():
    long = {str(p.relative_to(ROOT)): n for p in library_files() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_command_parses_from_its_config_and_runs_a_module_that_exists():
    import importlib.util

    from streamprune.cli import BENCHES, COMMANDS, build_parser

    build_parser()
    for command in [*COMMANDS.values(), *BENCHES.values()]:
        assert importlib.util.find_spec(command.module) is not None, command.module
