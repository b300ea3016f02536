"""The command line: ``defectscope fit|predict|evaluate|calibrate|tune|export|serve|batch|benchmark|demo``.

A thin front end over :mod:`defectscope.api`: :mod:`.commands` holds the parser and one handler per
command, :mod:`.options` the options several commands share, :mod:`.stdin_paths` the reading of
image paths from standard input.
"""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
