"""Declarative on-disk structures (construct): parse and build, no I/O, no pandas.

Nothing here imports from the rest of imgscope; every field carries the
sentence of the spec that defines it, which becomes the `description` column
of `Image.fields`.
"""
