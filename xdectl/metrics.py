"""(being written)"""


def register(app):
    """Add this module's commands to the xdectl typer app."""
