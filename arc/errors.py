"""User-facing errors: the CLI prints one line and exits 2 for these, never a traceback."""


class ArcError(Exception):
    """Bad input: unknown model, unsupported architecture or op, missing extra, bad engine."""


class UnsupportedError(ArcError):
    """An architecture, op or option that arc does not handle (yet)."""


class EngineError(ArcError):
    """An engine file that is corrupt, truncated, edited or built for something else."""


class MissingExtraError(ArcError):
    def __init__(self, what: str, extra: str):
        super().__init__(f"{what} is not installed: pip install 'arc-decode[{extra}]'")
