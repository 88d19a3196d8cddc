"""Check an installed natgrad wheel (run by .ci/run with the wheel's virtual environment).

The wheel, not the editable checkout, must be what is imported; its version must be the one
in ``natgrad/__init__.py``; its data files must be installed; the command must run.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import natgrad

root = Path(natgrad.__file__).resolve().parent
assert Path(sys.prefix).resolve() in root.parents, f"natgrad imported from {root}, not the wheel"
assert importlib.metadata.version("natgrad") == natgrad.__version__
for data in ("py.typed", "sb3/hyperparams/rat_trpo.yml", "sb3/hyperparams/rat_npg.yml"):
    assert (root / data).is_file(), f"{data} missing from the wheel"
command = Path(sys.executable).with_name("natgrad")
out = subprocess.run([command, "--version"], capture_output=True, text=True, check=True)
assert out.stdout.strip() == f"natgrad {natgrad.__version__}", out.stdout
print(f"wheel OK: natgrad {natgrad.__version__} from {root}")
