"""The front ends: the Python API, the rewrite pipeline they share, partial rewriting, ExportedProgram in/out,
model loading for the CLI, and the CLI."""
