"""Targets (data files + loader) and the backend: scheduler, liveness, arena planner, bundle emitter."""
