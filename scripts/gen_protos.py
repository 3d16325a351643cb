"""Regenerate the Python stubs (and their .pyi type stubs) from protos/.

Usage: python scripts/gen_protos.py [OUT_DIR]

OUT_DIR defaults to clients/python, so `codelane/v1/*_pb2*.py[i]` land inside the `codelane`
package that imports them. tests/test_codegen.py regenerates into a temporary folder and fails
when the checked-in files differ, so run this after every change under protos/.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
DEFAULT_OUT = REPO / "clients" / "python"
# codelane's contract, and the vendored REAPI subset (its Python modules live under codelane.reapi;
# protos/google/rpc only lets protoc resolve an import: googleapis-common-protos provides its module).
GENERATED_PACKAGES = ("codelane/v1", "codelane/reapi")
_DOCSTRINGS = {
    "codelane/v1": "Generated gRPC stubs of the codelane.v1 contract. Do not edit: run scripts/gen_protos.py.",
    "codelane/reapi": "Generated stubs of the vendored REAPI v2 and ByteStream subset. Do not edit: run "
    "scripts/gen_protos.py.",
}


def proto_files() -> list[str]:
    return sorted(
        str(p.relative_to(PROTO_ROOT)) for package in GENERATED_PACKAGES for p in (PROTO_ROOT / package).glob("*.proto")
    )


def plugin(name: str) -> str:
    """Path of a protoc plugin installed beside this interpreter (venvs need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' installs it (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Generate every stub into out_dir; return the files written (relative to out_dir)."""
    for package in GENERATED_PACKAGES:
        (out_dir / package).mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    written = []
    for package in GENERATED_PACKAGES:
        package_dir = out_dir / package
        (package_dir / "__init__.py").write_text(f'"""{_DOCSTRINGS[package]}"""\n')
        written += [p.relative_to(out_dir) for p in package_dir.iterdir() if p.is_file()]
    return sorted(written)


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out_dir):
        print(path)


if __name__ == "__main__":
    main()
