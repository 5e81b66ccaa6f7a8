"""One exception type for every user-facing problem.

The CLI prints ``edgeslim: error: <message>`` on one line and exits with status 2, so each
message must name the problem *and* the fix, e.g.
``checkpoint 'w.pt' is not a zip or pickle file: pass a file saved with torch.save``.
"""

__all__ = ["EdgeslimError"]


class EdgeslimError(Exception):
    """A problem with the user's input (file, model, data, option) that they can fix."""
