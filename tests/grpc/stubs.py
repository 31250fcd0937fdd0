"""Python stubs of ``echo.proto``, generated with ``grpc_tools.protoc`` (the .proto is the source).

``load(directory)`` generates ``echo_pb2.py``/``echo_pb2_grpc.py`` there once and imports them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).resolve().parent / "echo.proto"


def generate(directory: Path) -> None:
    """Write the stubs of ``echo.proto`` into ``directory``; fails loudly without grpcio-tools."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError(
            "grpcio-tools is missing: `pip install -e '.[dev]'` (scripts/test.sh does it)"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "echo_pb2_grpc.py").exists():
        return
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTO.parent}",
            f"-I{include}",
            f"--python_out={directory}",
            f"--grpc_python_out={directory}",
            str(PROTO),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")


def load(directory: Path) -> tuple[ModuleType, ModuleType]:
    """``(echo_pb2, echo_pb2_grpc)``, generated into ``directory`` when needed."""
    generate(directory)
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
