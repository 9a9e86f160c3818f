"""Sphinx configuration for the flatness docs (builds offline with ``-W``)."""

import flatness

project = "flatness"
author = "flatness developers"
copyright = "2026, flatness developers"
release = flatness.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",  # the example results in docs/results/*.md, rendered as Markdown
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# The NumPy-style "Parameters" sections already give every type: show the
# hints in the signature only, so each parameter is listed once.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"  # torch.Tensor, not torch._tensor.Tensor
python_use_unqualified_type_names = True
autodoc_preserve_defaults = True  # defaults as written in the source
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Type names from torch/numpy/scipy resolve only with intersphinx
# inventories, which need the network: without them they render as plain
# text, and -W stays about our own cross-references.
nitpicky = False

# Results written by the examples are Markdown files that the examples
# regenerate; they are pulled into the reStructuredText pages with
# ``.. include:: ... :parser: myst_parser.sphinx_`` and are not pages of
# their own.
source_suffix = {".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence"]
# The results pages are included inside a section of a guide page, and the
# multi-seed pages have a top-level heading per seed: their level relative
# to the including page is what counts, so the "starts at H1" check does not
# apply.
suppress_warnings = ["myst.header"]
exclude_patterns = ["_build", "results/*.md"]

# Literal blocks (``::``) are console output or plain text, never Python.
highlight_language = "none"

html_theme = "furo"
html_title = f"flatness {release}"
html_static_path = ["_static"]
html_css_files = ["wide_tables.css"]
