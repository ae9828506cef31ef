"""The package version, in one place: ``pyproject.toml`` reads it from here
(``[tool.setuptools.dynamic]``), and modules below the package root import it
from here rather than from ``slimnp`` itself."""

__version__ = "0.1.0"
