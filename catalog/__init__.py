"""The plan catalog: the knob schema, measured rows and the model identity they carry, Pareto
fronts, tenant SLOs and the pure policy. Pure Python and pandas: no tensors, no Ray, and no import
of the project's other packages (every other package builds on this one)."""
