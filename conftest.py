"""Repository-level pytest configuration.

The layerwise plugin itself is registered through the ``pytest11`` entry point of the installed
package (``pip install -e .``), exactly as for users; nothing here is needed for it to load.
"""

pytest_plugins = ["pytester"]  # the project's own tests drive the plugin with pytester

collect_ignore_glob = ["reports/*", "bench/*"]
