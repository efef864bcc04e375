"""Every program the tests and benchmarks run is installed by ``deploy/install-packages.sh``.

``tests/run.sh`` (and ``benchmarks/run.sh``) install packages with that script and nothing else, so
a test that calls a program no package in its list provides passes only on machines that happen
to have it (``wrk`` was one: only the benchmarks installed it, and the suite failed on a fresh
machine). This test reads the sources of ``tests/`` and ``benchmarks/`` for the programs they
run, maps each to its Debian package with ``PROVIDED_BY`` and checks that package is in the
script's ``PACKAGES`` (or is always present on Debian). No cluster, no network: milliseconds.
"""

from __future__ import annotations

import ast
import posixpath
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "deploy" / "install-packages.sh"
SCANNED = ("tests", "benchmarks")

VENV = "(the project's venv, deploy/python-env.sh)"

PROVIDED_BY = {
    "bash": "bash",
    "sh": "dash",
    "true": "coreutils",
    "cat": "coreutils",
    "echo": "coreutils",
    "env": "coreutils",
    "printf": "coreutils",
    "sleep": "coreutils",
    "setpriv": "util-linux",
    "git": "git",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sbatch": "slurm-wlm",
    "squeue": "slurm-wlm",
    "sacct": "slurm-wlm",
    "sacctmgr": "slurm-wlm",
    "scancel": "slurm-wlm",
    "scontrol": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "sdiag": "slurm-wlm",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "systemd-analyze": "systemd",
    "wrk": "wrk",
    "sudo": "sudo",
    "node": "nodejs",
    "npm": "npm",
    "chromium": "chromium",
    "broker": VENV,
}
"""Program -> the Debian 12 package that installs it (slurm-wlm pulls in slurm-client)."""

ALWAYS_THERE = {"bash", "dash", "coreutils", "util-linux", VENV}
"""Debian's Essential packages (on every system, never listed) and the project's own commands."""

_SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}
_PROGRAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def installed_packages(script: str) -> set[str]:
    """The words of the ``PACKAGES=(...)`` array of install-packages.sh."""
    match = re.search(r"^PACKAGES=\(([^)]*)\)", script, re.MULTILINE)
    assert match, "install-packages.sh has no PACKAGES=(...) array"
    return set(match.group(1).split())


def _callee(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _program(text: str) -> str | None:
    name = posixpath.basename(text)
    return name if _PROGRAM.fullmatch(name) else None


class _Module:
    """One source file: its argv-list assignments and the functions that run commands."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.lists: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    key = _callee_key(target)
                    if key and isinstance(node.value, ast.List | ast.Tuple):
                        self.lists[key] = node.value.elts
        # Callee name -> whether its first argument may be the program alone (``admin("sdiag")``
        # for ``def admin(self, *argv)``); otherwise only an argv list's head counts.
        self.runners = dict.fromkeys(_SUBPROCESS_CALLS, True)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        grew = True
        while grew:  # functions that call subprocess, or call a function that does
            grew = False
            for function in functions:
                if function.name in self.runners:
                    continue
                if any(
                    isinstance(n, ast.Call) and _callee(n) in self.runners
                    for n in ast.walk(function)
                ):
                    args = function.args
                    named = [a.arg for a in args.posonlyargs + args.args if a.arg != "self"]
                    self.runners[function.name] = not named and args.vararg is not None
                    grew = True

    def head(self, node: ast.expr, depth: int = 0) -> str | None:
        """The program an argv expression starts with, when the source says it literally."""
        if depth > 5:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return _program(node.value)
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            return self.head(node.elts[0], depth + 1)
        if isinstance(node, ast.Starred):
            return self.head(node.value, depth + 1)
        key = _callee_key(node)
        if key and key in self.lists and self.lists[key]:
            return self.head(self.lists[key][0], depth + 1)
        return None

    def programs(self) -> Iterator[tuple[int, str]]:
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = _callee(node)
            first = node.args[0]
            if name == "which":
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield node.lineno, first.value
            elif name in self.runners:
                if isinstance(first, ast.Constant) and not self.runners[name]:
                    continue
                program = self.head(first)
                if program is not None:
                    yield node.lineno, program


def _callee_key(node: ast.expr) -> str | None:
    """``argv`` for a name, ``.argv`` for ``self.argv``: how an assignment and a use meet."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return "." + node.attr
    return None


def programs_called(source: str) -> set[str]:
    """Programs a Python source runs (subprocess argv heads, also through its own wrappers) or
    looks for (``shutil.which``)."""
    return {program for _, program in _Module(ast.parse(source)).programs()}


def missing_packages(programs: Iterable[tuple[str, str]], packages: set[str]) -> Iterator[str]:
    """One problem line per (where, program) whose package is not installed by the script."""
    for where, program in sorted(set(programs)):
        package = PROVIDED_BY.get(program)
        if package is None:
            yield (
                f"{where}: runs {program!r}, which is not in PROVIDED_BY: add it with the Debian "
                "package that installs it (and that package to deploy/install-packages.sh)"
            )
        elif package not in packages and package not in ALWAYS_THERE:
            yield (
                f"{where}: runs {program!r} from package {package!r}, which "
                "deploy/install-packages.sh does not install: add it to PACKAGES"
            )


def _scanned_programs() -> Iterator[tuple[str, str]]:
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            for line, program in _Module(ast.parse(path.read_text())).programs():
                yield f"{path.relative_to(REPO)}:{line}", program


def test_every_program_the_tests_run_is_installed_by_the_install_script() -> None:
    found = list(_scanned_programs())
    # The scan must see the calls it exists for; an empty scan would pass vacuously.
    assert {"wrk", "promtool", "ssh-keygen", "sacctmgr"} <= {p for _, p in found}
    problems = list(missing_packages(found, installed_packages(INSTALL_SCRIPT.read_text())))
    assert not problems, "\n".join(problems)


WRK_BEFORE = """
import shutil, subprocess
def run_wrk(url):
    if shutil.which("wrk") is None:
        raise SystemExit("no wrk")
    subprocess.run(["wrk", "-d1s", url], check=True)
"""


def test_a_program_only_the_benchmarks_installed_is_caught() -> None:
    # The install script's list before wrk was added: the bench smoke test ran wrk anyway.
    before = installed_packages(
        "PACKAGES=(slurm-wlm slurmdbd munge openssh-server openssh-client mariadb-client "
        "prometheus)\n"
    )
    problems = list(missing_packages([("load.py", p) for p in programs_called(WRK_BEFORE)], before))
    assert problems == [
        "load.py: runs 'wrk' from package 'wrk', which deploy/install-packages.sh does not "
        "install: add it to PACKAGES"
    ]


def test_an_unknown_program_asks_for_a_table_entry() -> None:
    problems = list(missing_packages([("x.py:3", "frobnicate")], {"frobnicate"}))
    assert len(problems) == 1 and "not in PROVIDED_BY" in problems[0]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('subprocess.run(["git", "status"])', {"git"}),
        ('subprocess.Popen(["/usr/bin/prometheus", "--x"])', {"prometheus"}),
        ('ssh = ["ssh", "-p", "22"]\nsubprocess.run([*ssh, "true"])', {"ssh"}),
        (
            'def run(argv):\n    return subprocess.run(argv)\nrun(["promtool", "check"])',
            {"promtool"},
        ),
        (
            "class C:\n    def admin(self, *argv):\n        return subprocess.run(list(argv))\n"
            '    def ok(self):\n        return self.admin("sdiag")\n',
            {"sdiag"},
        ),
        ('shutil.which("systemd-analyze")', {"systemd-analyze"}),
        ("subprocess.run([sys.executable, '-m', 'x'])", set()),
    ],
)
def test_the_scan_finds_programs_however_they_are_called(source: str, expected: set[str]) -> None:
    assert programs_called(source) == expected
