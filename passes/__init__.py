"""Graph passes: one job per module, each ``run(graph, ctx) -> PassResult`` (see lmc.core.pass_manager)."""
