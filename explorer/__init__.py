"""Panel server: the feature map next to a steered, streaming chat."""
