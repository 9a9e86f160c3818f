"""Sphinx configuration for the flatness docs."""

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
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Type hints name classes from torch/numpy that intersphinx cannot resolve
# offline; keep -W builds about our own docs.
nitpicky = False
intersphinx_mapping = {}
html_theme = "furo"
html_title = f"flatness {release}"
exclude_patterns = ["_build"]
