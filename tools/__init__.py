"""Developer tools that are not shipped in the wheel (run from the repository root)."""
