"""The one exception type users see: its message is a single sentence saying what is wrong and what to do."""


class EgptError(Exception):
    """A user-facing error (bad input, missing file or package); the CLI prints it as one line and exits 2."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: the journal keeps every finished sample; --resume continues it."""

    def __init__(self, journal, kept: int, samples: int):
        self.journal, self.kept, self.samples = journal, kept, samples
        where = f"{kept} of {samples} counted samples are kept in {journal}" if journal else "no sample had finished"
        super().__init__(f"interrupted: {where}; rerun the same command with --resume to continue.")
