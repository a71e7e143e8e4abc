"""Repository-level pytest configuration.

The layerwise plugin itself is registered through the ``pytest11`` entry point of the installed
package (``pip install -e .``), exactly as for users; nothing here is needed for it to load.
The project's own tests drive the plugin with pytester, enabled by ``-p pytester`` in the ini
options (not ``pytest_plugins`` here: this file is also seen when the shipped suite in
``layer_tests/`` is collected from another folder, where a ``pytest_plugins`` would be refused).
"""

collect_ignore_glob = ["reports/*", "bench/*"]
