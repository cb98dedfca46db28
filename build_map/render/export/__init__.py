"""The single-file export: card data encoded for the browser, and the page that carries it."""
