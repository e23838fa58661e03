"""The versions of Python and of the libraries behind a run's numbers, recorded with its results."""

from __future__ import annotations

import platform

# What decides a run's numbers: the training stack, the data loader and the pipeline runner.
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "dvc")


def package_versions() -> dict[str, str | None]:
    """{"python": ..., each of PACKAGES: its installed version or None, "cuda": the CUDA torch was built for}."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda  # None for a CPU build
    return versions
