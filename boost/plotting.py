"""matplotlib, when it is installed (a dev extra), and figures saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path

from boost.atomic import replace_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig, path: Path, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` (PNG, atomically) and close it."""
    replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)
    return path


def integer_ticks(ax) -> None:
    """Ticks on whole numbers only on ``ax``'s x axis (steps are counts: no 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
