"""Sparse autoencoders: the module, the file formats researchers have, and the TopK trainer."""
