"""The one exception a user's mistake raises: the CLI prints its message
as a single line and exits 2, with no traceback."""


class XdeError(Exception):
    pass
