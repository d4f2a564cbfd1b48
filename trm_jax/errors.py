"""The one exception type for a user's mistake.

Every input error of the project (a config key, a flag, a dataset file, a
checkpoint of another run, a challenges file, a ``.pt`` file) derives from
``UserError``. The entry points (``launch.py``, the ``data_prep`` and tool
command lines) catch this type alone and print its message as one
``error: ...`` line with exit status 2; anything else is a bug and keeps its
traceback. Types that were ``ValueError``/``OSError`` before keep that base
too, so code that catches those still does.
"""


class UserError(Exception):
  """A mistake in the config, the data, a file or the command line (reported as one line)."""


class NonFiniteLossError(UserError, RuntimeError):
  """The loss became NaN or infinite (reported as one line saying what to lower)."""
