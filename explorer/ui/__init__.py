"""The explorer's Panel page: the app and its panels (edits, chat, recipes, sweep, attribution),
the components with their browser halves, card HTML, and the bridge between worker threads and
the page. The UI never computes: numbers come from build_map."""
