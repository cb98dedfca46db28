"""The bundle: the one contract between the builder and the explorer (schema, read, write, and
what its manifest says it was built from)."""
