"""requirements.txt (what ComfyUI-Manager installs) and pyproject.toml (the library) name the same packages.

requirements.txt leaves out torch and torchvision, which ComfyUI's environment already has, and takes
onnxruntime-gpu where a CUDA build exists; pyproject.toml takes the plain onnxruntime, which insightface
(the tests' reference) also pulls in, so the two are never installed side by side in the test venv.
"""

from __future__ import annotations

import sys

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROVIDED_BY_COMFYUI = {"torch", "torchvision"}
ONNXRUNTIME_BUILDS = {"onnxruntime", "onnxruntime-gpu"}
# The platforms users run ComfyUI on, as PEP 508 marker variables.
PLATFORMS = [{"sys_platform": system, "platform_machine": machine}
             for system, machines in (("linux", ("x86_64", "aarch64")), ("win32", ("AMD64", "ARM64")),
                                      ("darwin", ("arm64", "x86_64")))
             for machine in machines]
CUDA_PLATFORMS = {("linux", "x86_64"), ("win32", "AMD64")}


def requirements_file() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def project_dependencies() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return [Requirement(line) for line in tomllib.load(file)["project"]["dependencies"]]


def family(requirement: Requirement) -> str:
    return "onnxruntime" if requirement.name in ONNXRUNTIME_BUILDS else requirement.name


def test_every_line_is_valid_pep508():
    # packaging is what pip and uv parse with; a marker with `not` raises InvalidRequirement here.
    assert requirements_file()


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: f"{p['sys_platform']}-{p['platform_machine']}")
def test_one_onnxruntime_build_per_platform(platform):
    chosen = [r.name for r in requirements_file() if r.name in ONNXRUNTIME_BUILDS
              and (r.marker is None or r.marker.evaluate(platform))]
    cuda = (platform["sys_platform"], platform["platform_machine"]) in CUDA_PLATFORMS
    assert chosen == ["onnxruntime-gpu" if cuda else "onnxruntime"]


def test_same_packages_and_bounds_as_pyproject():
    pack = {}
    for requirement in requirements_file():
        pack.setdefault(family(requirement), set()).add(str(requirement.specifier))
    library = {family(r): {str(r.specifier)} for r in project_dependencies() if r.name not in PROVIDED_BY_COMFYUI}
    assert pack == library
