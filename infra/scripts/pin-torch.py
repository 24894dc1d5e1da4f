"""Print a pip constraint that keeps the base image's torch, after checking it is within midpo's range.

infra/Dockerfile writes it to /etc/pip-constraints.txt (PIP_CONSTRAINT), so `pip install .` never replaces
the image's CUDA build of torch with another wheel: a dependency that wanted a different torch fails the
build instead. The range is pyproject.toml's: torch>=2.4,<=2.13.0.
"""

import importlib.metadata
import re
import sys

LOW, HIGH = (2, 4, 0), (2, 13, 0)

try:
    version = importlib.metadata.version("torch")
except importlib.metadata.PackageNotFoundError:
    sys.exit("the base image has no torch: use a CUDA PyTorch image (e.g. pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime)")
release = tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])
if not LOW <= release <= HIGH:
    sys.exit(f"the base image's torch {version} is outside midpo's range torch>=2.4,<=2.13.0 (pyproject.toml)")
print(f"torch=={version}")
