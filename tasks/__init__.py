"""Reproductions of Raghu et al. 2021 used to validate hypergrad: ``python -m tasks <name> ...``."""
