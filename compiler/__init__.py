"""The spine of lmc: loading, IR helpers, the pass manager, build(), verify(), the CLI."""
