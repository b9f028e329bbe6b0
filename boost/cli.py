"""What the ``python -m boost...`` command lines share: an error is one line, without a usage banner.

argparse prints its usage (3 lines for ``boost.train``, 17 for ``boost.rollout.evaluate``) before
every error, which pushes the one line that matters out of sight. :class:`ArgumentParser` prints
``<prog>: error: <message>`` and a pointer to ``--help`` on that same line, and exits with status 2
as argparse does.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose :meth:`error` is one line: the message and where usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")
