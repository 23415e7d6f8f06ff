"""Networks used by the reproductions (importable from the repository root, not installed)."""
