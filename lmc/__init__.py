"""lmc — an ahead-of-time ONNX compiler for low-memory devices.

The package maps the repository's top-level folders under one import name:
``lmc.compiler`` (the spine), ``lmc.passes``, ``lmc.targets`` and ``lmc.models``.
The public Python API is re-exported here lazily::

    import lmc
    result = lmc.build("model.onnx", lmc.BuildOptions(target="cortex-a55",
                       input_shapes={"input_ids": (1, 256)}), "out/")
    lmc.build("decoder-with-past.onnx", lmc.BuildOptions(context=512), "gen/")
    print(lmc.generate("gen/", [1, 2, 3], max_new_tokens=20).tokens)      # greedy, prompt-lookup drafts
    run = lmc.generate("gen/", [1, 2, 3], 20, speculate="lookup:4")         # or "off", "draft:4" with draft=
    run = lmc.generate("gen/", [1, 2, 3], 20, temperature=0.7, top_p=0.9, seed=1, stop_tokens=[2])
"""

__version__ = "0.1.0"

__all__ = ["build", "BuildOptions", "BuildResult", "QuantizeMode", "verify", "inspect_model", "generate",
           "GenerationResult", "LmcError", "__version__"]

_LAZY = {
    "build": "lmc.compiler.build",
    "BuildOptions": "lmc.compiler.compilation",
    "BuildResult": "lmc.compiler.build",
    "QuantizeMode": "lmc.compiler.compilation",
    "verify": "lmc.compiler.verify",
    "inspect_model": "lmc.compiler.inspection",
    "generate": "lmc.compiler.run_generation",
    "GenerationResult": "lmc.compiler.drivers",
    "LmcError": "lmc.core.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


def __dir__() -> list[str]:
    """The module's own names and the lazily imported public ones (so ``dir()`` and ``help()`` list them)."""
    return sorted(set(globals()) | set(__all__))
