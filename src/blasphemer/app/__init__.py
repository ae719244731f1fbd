"""The app layer: reads :class:`~blasphemer.app.config.Settings`, prints, and sequences a run.

Everything below it (the library: prompts, loading, architectures, residuals, directions,
ablation, editing, evaluation, optimization, export, GGUF) takes plain values and returns plain
values; it never imports this package (a test checks the import graph).
"""
