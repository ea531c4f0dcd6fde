"""tlbuild: a build system for edge image classifiers."""

__version__ = "0.1.0"
