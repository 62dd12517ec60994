"""The pass manager's contract: an internal error names its pass, a fixed point that does not settle says so,
and whether a run was approximate is taken from the run itself."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from lmc.core.errors import LmcError
from lmc.core.pass_manager import (FixedPoint, PassContext, PassError, PassKind, PassManager, PassResult,
                                       approximations)


def _graph() -> gs.Graph:
    x, y = gs.Variable("x", np.float32, [2]), gs.Variable("y", np.float32, [2])
    return gs.Graph(nodes=[gs.Node("Relu", name="relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y],
                    opset=17)


class _Pass:
    requires = frozenset()
    in_place = True
    preserves_shapes = True

    def __init__(self, name, run, kind=PassKind.EXACT):
        self.name, self._run, self.kind = name, run, kind

    def run(self, graph, ctx):
        return self._run(graph)


def test_an_internal_error_names_its_pass():
    broken = _Pass("broken-rule", lambda g: {}["missing"])
    with pytest.raises(PassError, match="pass 'broken-rule' failed: KeyError"):
        PassManager([broken], PassContext()).run(_graph())


def test_user_errors_pass_through_unchanged():
    def refuse(graph):
        raise LmcError("the model is wrong")
    with pytest.raises(LmcError, match="^the model is wrong$"):
        PassManager([_Pass("refusing", refuse)], PassContext()).run(_graph())


def test_a_fixed_point_that_does_not_settle_says_so():
    always = _Pass("always-changes", lambda g: PassResult(g, modified=True))
    graph, records = PassManager([FixedPoint("loop", [always], max_iterations=3)], PassContext()).run(_graph())
    assert len(records) == 3 and "still changing the graph after 3 rounds" in " ".join(records[-1].notes)


def test_exactness_comes_from_the_runs():
    unchanged = _Pass("quantize-nothing", lambda g: PassResult(g, modified=False), PassKind.APPROXIMATE)
    changed = _Pass("quantize-some", lambda g: PassResult(g, modified=True), PassKind.APPROXIMATE)
    labelled = _Pass("cache", lambda g: PassResult(g, modified=True, approximation="kv-cache int8"))
    _, records = PassManager([unchanged], PassContext()).run(_graph())
    assert approximations(records) == ()              # asked to approximate, changed nothing: exact
    _, records = PassManager([changed, labelled, labelled], PassContext()).run(_graph())
    assert approximations(records) == ("quantize-some", "kv-cache int8")
