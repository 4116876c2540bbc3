"""The version, in one place: the package, the CLI and pyproject.toml read it here."""

__version__ = "0.3.0"
