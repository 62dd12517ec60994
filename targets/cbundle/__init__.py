"""The C bundle: a compiled graph as portable C99 for microcontrollers, obeying its memory plan.

``emit.emit_c(graph, plan, target, folder)`` writes ``model.h``, ``model.c`` (one kernel call per
scheduled node, every intermediate at ``lmc_arena + offset``), ``weights.c`` (const arrays in flash),
``runner.c``, ``CMakeLists.txt`` and the kernel sources it uses (copied from ``kernels/``);
``host.HostBuild`` compiles a bundle with the host C compiler and runs it through the runner's file
protocol (``lmc_in_<k>.bin`` → ``lmc_out_<k>.bin``).

Adding ops: write a module ``ops_<family>.py`` in this package whose emitters are registered on
``registry.REGISTRY`` with ``@REGISTRY.op("OpType"[, domain="com.microsoft"])``. An emitter takes an
``OpContext`` (node, ``TensorRef`` inputs/outputs with dtype, shape, placement and C address; constants
carry their value), checks attributes/shapes/dtypes (``op.unsupported(reason)`` raises the
``UnsupportedOp`` error naming the node) and returns a ``KernelCall(code, families, params, macs)``.
Kernels of a family live in ``kernels/lmc_kernels_<family>.h`` / ``.c`` (declared in the ``.h``, which
includes ``lmc_kernels.h``); naming the family in ``KernelCall.families`` is what copies them into the
bundle and includes the header in ``model.c``. ``registry.load_op_modules()`` imports every ``ops_*``
module, so no other file changes. List the new kernel files in pyproject's package data
(``kernels/*.c``, ``kernels/*.h`` already match).
"""
