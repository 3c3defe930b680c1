"""vramplan's planning core: pure functions from a ModelSpec and TrainingOptions to a Plan.

Nothing here imports torch, transformers or a web framework at module level; only
`planner.introspect` touches torch, and only when a model is not in the catalog.
"""
