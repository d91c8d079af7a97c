"""The lesson on momentum and adaptive gradients, run on hwoptim's own kernels.

``landscapes``: 2-D and N-dimensional test functions; ``trajectories``: optimizer paths on
them; ``batching``: BGD, SGD and MBGD on small data sets; ``viz``: the ``hwoptim viz``
command that draws the pictures. Uses only hwoptim's public API; the core never imports
this package. Its claims are tests in ``tests/test_lesson.py``.
"""
