"""Write the test models: ``python -m lmc.models [OUT_DIR]`` (default ``models-out``)."""

import sys
from pathlib import Path

import onnx

from lmc.models import BUILDERS


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models-out")
    out.mkdir(parents=True, exist_ok=True)
    for name, builder in BUILDERS.items():
        path = out / f"{name}.onnx"
        onnx.save(builder(), str(path))
        print(path)


if __name__ == "__main__":
    main()
