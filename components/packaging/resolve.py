"""Find a verified local bundle from what a user names: a folder, a .tar.gz, or a registry URI.

MLflow is imported only for `models:/` URIs, so serving a local bundle stays light.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from components.errors import VisionflowError
from components.packaging.bundle import unpack_bundle, verify_bundle

BUNDLE_ARTIFACTS = "bundle"  # the run artifact folder that holds a pipeline run's bundle


def _registry_bundle(source: str, cache_dir: str) -> Path:
    from components import tracking

    ref = source.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = tracking.alias_version(name, alias)
        if version is None:
            raise VisionflowError(f"no model version {source} in {tracking.tracking_uri()}")
    else:
        name, _, number = ref.partition("/")
        try:
            version = tracking.client().get_model_version(name, number)
        except Exception:
            raise VisionflowError(f"no model version {source} in {tracking.tracking_uri()}") from None
    dest = Path(cache_dir) / "registry" / name / str(version.version)
    if not (dest / BUNDLE_ARTIFACTS).is_dir():
        tracking.download_run_artifacts(version.run_id, BUNDLE_ARTIFACTS, dest)
    return dest / BUNDLE_ARTIFACTS


def resolve_bundle(source: str, cache_dir: str = ".visionflow") -> Path:
    """A verified local bundle folder for a folder, a .tar.gz, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`.

    Archives are unpacked (safely) under `cache_dir`/bundles, registry bundles downloaded under
    `cache_dir`/registry. Raises VisionflowError for a missing source or a bundle that fails verification.
    """
    if source.startswith("models:/"):
        bundle = _registry_bundle(source, cache_dir)
    else:
        path = Path(source)
        if not path.exists():
            raise VisionflowError(f"bundle not found: {source}")
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            bundle = unpack_bundle(path, Path(cache_dir) / "bundles" / digest)
        else:
            bundle = path
    verify_bundle(bundle)
    return bundle.resolve()
