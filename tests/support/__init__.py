"""Helpers for the tests (not tests themselves): tiny models, a tiny bundle on disk, offline
headless Chromium, and a Python reader of the export's card data."""
