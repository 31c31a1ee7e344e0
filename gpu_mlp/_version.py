"""The package's version, in a module of its own: the modules that record it (a
checkpoint's metadata, the CLI's ``--version``) import it from here, not from the
package, whose ``__init__`` imports every module."""

__version__ = "0.1.0"
