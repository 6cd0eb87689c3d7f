"""Consumers of the common model: host layout (regions) and checks."""
