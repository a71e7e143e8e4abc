"""Repository-level pytest configuration.

The layerwise plugin itself is registered through the ``pytest11`` entry point of the installed
package (``pip install -e .``), exactly as for users; nothing here is needed for it to load.
"""

collect_ignore_glob = ["reports/*", "bench/*"]
