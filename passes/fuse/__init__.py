"""Fusion rules (one per module) and the pass that applies them (``rule.FuseRules``)."""
