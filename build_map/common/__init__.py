"""Plumbing every room shares: cache folders, atomic writes and hashes, device and dtype choice,
and the project's static (browser) files."""
