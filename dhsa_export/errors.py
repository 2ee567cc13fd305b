"""User-facing errors.

Every problem a user can fix (bad option, unknown model, missing package) is raised as a
:class:`DHSAError` whose message names the offending value and the fix. The CLI prints it as one
line and exits non-zero; Python callers can catch it.
"""

from __future__ import annotations


class DHSAError(Exception):
    """An error the user can act on; its message is a single line naming the value and the fix."""
