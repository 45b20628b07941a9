"""The one exception type users see: its message is a single sentence saying what is wrong and what to do."""


class EgptError(Exception):
    """A user-facing error (bad input, missing file or package); the CLI prints it as one line and exits 2."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: the journal keeps every finished sample; --resume continues it."""

    def __init__(self, journal, kept: int, samples: int):
        self.journal, self.kept, self.samples = journal, kept, samples
        where = f"{kept} of {samples} counted samples are kept in {journal}" if journal else "no sample had finished"
        super().__init__(f"interrupted: {where}; rerun the same command with --resume to continue.")


class StrategyFailed(Exception):
    """A strategy raised while decoding a sample. A candidate failing in warm-up is left out (the runner records the
    reason); otherwise the run stops with this, naming it, and the journal keeps every finished sample.

    Only the first line of the error is kept: inductor's lowering errors carry hundreds of lines of IR, which buried
    the strategy's name (a four-strategy compare on the H200 ended in an 800-line message naming none of them)."""

    def __init__(self, strategy: str, sample: int, counted: bool, error: BaseException):
        self.strategy, self.sample, self.counted, self.error = strategy, sample, counted, error
        self.kept: str | None = None  # set by the runner: where the finished samples are
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        self.reason = f"{type(error).__name__}: {first_line[:300]}"
        super().__init__(strategy, sample, counted, error)

    def __str__(self) -> str:
        tail = f"; {self.kept}" if self.kept else ""
        return (f"{self.strategy} failed on {'counted' if self.counted else 'warm-up'} sample {self.sample}: "
                f"{self.reason}{tail}; run the others without it, or add --debug for the traceback.")
