"""The package version and the model-file format version (no imports: read by ``--version`` and
every layer).

The package follows semantic versioning (``CHANGELOG.md``). :data:`MODEL_FORMAT_VERSION` rises
when a model file written by this version cannot be read correctly by an older one; a reader
refuses files of a newer format with the version that wrote them (:mod:`defectscope.io`).
"""

__version__ = "0.3.0"
#: the newest model-file format this version reads and writes (``format_version`` in its metadata).
#: 2: the model is judged by a region rule (``judge``, defectscope.judging) or over a region of interest
#: (``roi``, defectscope.components.roi), which a reader of format 1 would ignore; other files are still
#: written as format 1, which every version reads.
MODEL_FORMAT_VERSION = 2
