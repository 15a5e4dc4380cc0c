"""The one exception type for user mistakes (bad config, missing input, unreadable file).

`vitjax.main` prints a `UserError` as one line `error: <message>` and exits with status 2;
everything else is a bug and keeps its traceback. Messages name what is wrong and how to fix it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""
