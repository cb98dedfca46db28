"""The geometry of decoder directions: nearest neighbours, the 2-D map (UMAP's layout) and its
nested clusters."""
