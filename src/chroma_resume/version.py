"""The package version: one place, read by pyproject.toml (setuptools dynamic), `--version` and `__init__`."""
__version__ = "0.1.0"
