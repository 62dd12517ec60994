"""``--prune`` on a generation build: the generalised decoder (symbolic sequence length, cache as state) is
pruned once, before any quantization, calibrated by prefills of the ``--calib`` token sequences (as
quantization is). Removing whole key/value groups shrinks the state inputs/outputs [B, H_kv, N, d] they
read and write; the shape templates (``lmc.compiler.generation``: size = a·S + b per dim) of every tensor
the pass resized take its new constant sizes, so the plan's state, the drivers' buffers and the check see
the smaller cache.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lmc.compiler.compilation import Compilation
from lmc.compiler.generation import Template, calibration_feeds
from lmc.compiler.pipeline import prune_passes
from lmc.core.metadata import GenerationInfo
from lmc.core.pass_manager import PassRecord
from lmc.passes.prune import Prune
from lmc.passes.quantize.calibration import load_calibration


def prune_generation(graph: gs.Graph, info: GenerationInfo, templates: Template, compilation: Compilation
                     ) -> tuple[gs.Graph, list[PassRecord]]:
    """Prune the generalised ``graph`` as ``compilation.options.prune_spec`` asks; ``templates`` (updated in
    place) follow every resized axis."""
    options = compilation.options
    samples = load_calibration(options.calib, [info.input_ids], options.calib_samples)
    passes = prune_passes(options, [info.input_ids], calibration_feeds(samples, info, graph))
    graph, records = compilation.run(graph, passes)
    pruner = next(p for p in passes if isinstance(p, Prune))
    for name, (axis, size) in pruner.resized.items():
        dims = templates.get(name)
        if dims is not None:
            dims = list(dims)
            a, _ = dims[axis]
            if a != 0:
                raise RuntimeError(f"pruning resized {name}'s axis {axis}, which grows with the sequence")
            dims[axis] = (0, size)
            templates[name] = dims
    return graph, records
