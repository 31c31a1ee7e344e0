"""README.md's numbers are what its commands print today.

Every ``$ gpu-mlp train ...`` example in README.md with its printed output, the quick
start's output and the DP table's rows are run here, on the CPU, and each line README
shows must be a line the command prints: exactly, except the wall-clock times (only the
words before them are compared) and ``...`` (lines left out). A change that moves a
number fails here until README says what the command now prints.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 120  # seconds for one command


def _sections() -> dict[str, str]:
    """README's ``## `` sections by title."""
    parts = re.split(r"^## (.+)$", README.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """The fenced blocks of ``text``: (info string, lines)."""
    return [(info, body.splitlines())
            for info, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S)]


def _run(command: str, cwd) -> list[str]:
    """What ``command`` (``gpu-mlp ...``) prints on stdout and stderr, on the CPU."""
    argv = shlex.split(command)
    assert argv[0] == "gpu-mlp", command
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-m", "gpu_mlp", *argv[1:], "--device", "cpu"],
                          cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return (done.stdout + done.stderr).splitlines()


# A time varies from run to run: what precedes it is compared, not the numbers.
_TIMED = re.compile(r"^(trained epochs \d+-\d+) in [\d.]+ s \([\d,]+ samples/s\)$")


def _check_shown(shown: list[str], printed: list[str], command: str) -> None:
    for line in shown:
        if line == "...":
            continue
        timed = _TIMED.match(line)
        if timed:
            assert any(p.startswith(timed.group(1) + " in ") for p in printed), \
                f"README shows {line!r} for {command}, which printed:\n" + "\n".join(printed)
        else:
            assert line in printed, \
                f"README shows {line!r} for {command}, which printed:\n" + "\n".join(printed)


def _examples() -> list[list[tuple[str, list[str]]]]:
    """The ``$ gpu-mlp ...`` examples: each a list of (command, the output lines shown
    after it, up to the next command)."""
    examples = []
    for _, lines in _blocks("".join(_sections().values())):
        steps = []
        for line in lines:
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
        if steps and all(command.startswith("gpu-mlp ") for command, _ in steps):
            examples.append(steps)
    return examples


def test_readme_has_examples_to_check():
    assert len(_examples()) >= 2


@pytest.mark.parametrize("steps", _examples(), ids=[steps[-1][0] for steps in _examples()])
def test_command_line_examples_print_what_readme_shows(tmp_path, steps):
    if any("--plot" in command for command, _ in steps):
        pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    for command, shown in steps:  # in order: a step may need the files of the one before
        _check_shown(shown, _run(command, tmp_path), command)


def test_quick_start_prints_what_readme_shows(tmp_path):
    blocks = _blocks(_sections()["Quick start"])
    (_, [install_and_run]), (_, shown) = blocks[0], blocks[1]
    command = install_and_run.split("&&")[-1].strip()
    assert command == "python -m gpu_mlp train"
    _check_shown(shown, _run("gpu-mlp train", tmp_path), command)


def _dp_table() -> list[tuple[str, str, str, str]]:
    """The DP section's table: (command, solved noise or "", test accuracy, epsilon)."""
    text = _sections()["Differentially private training (DP-SGD)"]
    return re.findall(r"^\| `(gpu-mlp train[^`]*)`(?: \(noise ([\d.]+) solved\))? \| "
                      r"([\d.]+) \| ([^|]+?) \|$", text, flags=re.M)


def test_dp_table_is_what_the_commands_print(tmp_path):
    rows = _dp_table()
    assert len(rows) == 3
    for command, noise, accuracy, epsilon in rows:
        printed = _run(command, tmp_path)
        if noise:
            assert any(line.startswith("privacy: DP-SGD") and
                       f"noise multiplier {noise}," in line for line in printed), \
                (command, printed)
        assert f"test accuracy: {accuracy}" in printed, (command, printed)
        if epsilon != "(not private)":
            spent = [line for line in printed if line.startswith("privacy: epsilon ")]
            assert spent and f"{float(spent[0].split()[2]):.2f}" == epsilon, (command, spent)
