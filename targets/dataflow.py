"""The backend's view of a graph: steps that read and write named tensors of known byte sizes.

This is all the scheduler, liveness analysis and arena planner know — no ONNX. ``sizes`` holds only the
tensors the arena must place (intermediates); names absent from it (graph inputs/outputs, weights) are
ignored by the planner. ``scratch`` is per-step working memory a kernel needs beyond its outputs (e.g. the
score matrix inside a fused attention op): a buffer alive for that one step. A step holding subgraphs (an If
or Loop/Scan node) lists the outer tensors its bodies read among its inputs, and its scratch includes the
largest live set of its bodies' own intermediates.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    scratch_bytes: int = 0
    # (input, output) pairs the kernel may compute in place: output may take the input's bytes when the
    # input dies at this step and the sizes match.
    inplace: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Dataflow:
    steps: tuple[Step, ...]
    sizes: dict[str, int] = field(default_factory=dict)

    def producers(self) -> dict[str, int]:
        """Tensor name -> index of the step that writes it."""
        return {t: i for i, s in enumerate(self.steps) for t in s.outputs}
