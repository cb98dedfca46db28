"""Names: feature labels (automatic, imported, LLM) and the names of the map's clusters."""
