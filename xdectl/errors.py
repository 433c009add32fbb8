"""The exceptions the CLI turns into messages, and the teardown that never
stops at its first broken piece."""


class XdeError(Exception):
    """A user's mistake or a refused change: the CLI prints its message as a
    single line and exits 2, with no traceback."""


class Incomplete(XdeError):
    """A teardown removed what it could; `lines` say what it could not. The
    CLI prints one line each and exits 1: running it again finishes the job."""

    def __init__(self, lines):
        super().__init__("; ".join(lines))
        self.lines = lines


class Teardown:
    """Runs every removal step it is given, whatever the earlier ones did, and
    remembers those that failed."""

    def __init__(self):
        self.failed = []

    def step(self, what, fn, *args):
        """fn(*args), or None with a note 'could not WHAT: why' if it raised."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a teardown goes on regardless
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failed.append(f"could not {what}: {why}")
            return None

    def done(self):
        if self.failed:
            raise Incomplete(self.failed)
