"""Built-in kdhooks plugins, one module per family of methods.

They are declared in the ``kdhooks`` entry-point group exactly like a
third-party plugin, and use only the public ``kdhooks`` API.
"""
