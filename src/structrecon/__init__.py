"""structrecon: invert invariant fingerprints of atomic structures back to 3D structures."""

from importlib.metadata import PackageNotFoundError, version

from ._errors import StructreconError

try:
    __version__ = version("structrecon")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = ["StructreconError", "__version__"]
