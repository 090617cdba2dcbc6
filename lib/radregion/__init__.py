"""RadRegion: anatomical-region labels for every radiograph in a hospital archive."""

__version__ = "0.1.0"
