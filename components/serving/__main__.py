"""`python -m components.serving BUNDLE [--host H --port P ...]`: the model server without the CLI's
dependencies (no Prefect, MLflow, torch), the entry point of the slim serving image (docker/Dockerfile.serve).

Every ServeSettings field is an option (`--max-batch 16`, `--store-images true`); VISIONFLOW_SERVE_<FIELD>
environment variables (e.g. VISIONFLOW_SERVE_PORT=8080) give defaults. A bad value or bundle prints one
line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from components.errors import VisionflowError
from components.serving.app import ServeSettings, serve

ENV_PREFIX = "VISIONFLOW_SERVE_"


def parse_settings(argv: list[str]) -> tuple[Path, ServeSettings]:
    """Read the bundle path and ServeSettings from command-line arguments and VISIONFLOW_SERVE_* variables.

    Takes argv without the program name. Returns (bundle path, settings). Raises SystemExit(2) with
    argparse's message for unknown options, ValidationError for invalid values.
    """
    parser = argparse.ArgumentParser(prog="python -m components.serving", description=__doc__.splitlines()[0])
    parser.add_argument(
        "bundle",
        nargs="?",
        default=os.environ.get(ENV_PREFIX + "BUNDLE", "/bundle"),
        help="Bundle folder or .tar.gz (default: $VISIONFLOW_SERVE_BUNDLE or /bundle).",
    )
    for name, field in ServeSettings.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=os.environ.get(ENV_PREFIX + name.upper()),
            help=f"{field.description} (default: {field.default})",
        )
    args = vars(parser.parse_args(argv))
    bundle = Path(args.pop("bundle"))
    return bundle, ServeSettings(**{k: v for k, v in args.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    """Serve a bundle until interrupted; returns the exit code (2 on a bad setting or bundle)."""
    try:
        bundle, settings = parse_settings(sys.argv[1:] if argv is None else argv)
        serve(bundle, settings)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        print(f"error: invalid setting: {problems}", file=sys.stderr)
        return 2
    except (VisionflowError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
