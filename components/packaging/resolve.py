"""Find a verified local bundle from what a user names: a folder, a .tar.gz, or a registry URI.

MLflow is imported only for `models:/` URIs, so serving a local bundle stays light.
"""

from __future__ import annotations

from pathlib import Path

from components.bundle_format import unpack_bundle, verify_bundle
from components.errors import VisionflowError
from components.safety import file_sha256

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
        verify_bundle(bundle)
        return bundle.resolve()
    path = Path(source)
    if not path.exists():
        raise VisionflowError(f"bundle not found: {source}")
    if path.is_file():  # unpacking verifies the unpacked (or already present) bundle
        return unpack_bundle(path, Path(cache_dir) / "bundles" / file_sha256(path)[:16]).resolve()
    verify_bundle(path)
    return path.resolve()
