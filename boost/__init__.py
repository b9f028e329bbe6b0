"""boost: a thin trainer for BOOST (bilevel reweighting of synthetic multi-turn trajectories).

The fused kernels live in the sibling package :mod:`boost_kernels`.
"""

__version__ = "0.1.0"
