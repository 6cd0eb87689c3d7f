"""Byte access: bounds-checked file sources, path confinement and the guest reader."""
