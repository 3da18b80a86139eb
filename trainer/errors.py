"""Errors that end a run with one line on stderr (the CLI prints them; no traceback)."""


class RunAborted(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); exit code 3."""


class RunStopped(Exception):
    """Stopped by a signal after saving a checkpoint; exit code 128 + the signal, as if
    the signal had ended the process (what Slurm, Kubernetes and torchrun expect)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
