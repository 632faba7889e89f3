"""The one exception type that reaches users as a single sentence."""


class LfmEdgeError(Exception):
    """A problem the user can fix (bad file, bad flag, bad prompt).

    The CLI prints ``str(error)`` alone and exits non-zero; nothing that raises
    this should need a traceback to be understood.
    """
