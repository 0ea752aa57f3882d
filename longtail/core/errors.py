"""User-facing errors.

Every mistake a user can make (a missing dataset, a bad config key, an unwritable folder) raises
:class:`LongtailError` with one paragraph that names the problem and the fix. The command line
prints that paragraph and exits with a non-zero code instead of showing a traceback.
"""


class LongtailError(Exception):
    """A problem the user can fix; ``str(err)`` says what it is and what to do."""


class ConfigError(LongtailError):
    """A config file or override is invalid; the message names the offending key."""


class DataError(LongtailError):
    """A dataset is missing, truncated or corrupt; the message names the path and the fix."""
