"""strongroomd: the Strongroom key-management daemon."""

__version__ = "0.1.0"
