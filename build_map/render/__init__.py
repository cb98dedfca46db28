"""Pages: the DataMapPlot map with no CDN, and the single-file offline export."""
