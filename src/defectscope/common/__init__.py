"""Helpers every layer may use and that depend on nothing above :mod:`defectscope.errors`.

:mod:`.files` writes output files safely (never a half file in place of a good one),
:mod:`.progress` draws progress bars when asked, :mod:`.jsonout` writes JSON with numpy values,
:mod:`.argtypes` holds the argparse value types the command line and ``serve`` share.
"""
