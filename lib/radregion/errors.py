"""The one error type for input that RadRegion cannot use."""

from pathlib import Path


class RadiographError(ValueError):
    """A file that cannot be used, with the file and the reason in words."""

    def __init__(self, path, problem: str):
        self.path = str(path) if isinstance(path, Path) else path
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
