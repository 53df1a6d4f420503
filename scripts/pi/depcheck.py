"""Every runtime dependency the installed ftte-fleet declares is installed, except those named
on the command line (the ones PyPI cannot provide for this architecture).

scripts/pi-check runs it after the armhf install, whose README line lists the dependencies by
hand (`pip install --no-deps .` and then the rest): a dependency added to pyproject.toml but not
to that line fails here with its name, instead of as an ImportError somewhere later.
"""
import importlib.metadata as md
import re
import sys

allowed_missing = {a.lower() for a in sys.argv[1:]}
missing = []
for req in md.requires("ftte-fleet") or []:
    if "extra ==" in req:
        continue
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    if name.lower() in allowed_missing:
        continue
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(req.split(";")[0].strip())
if missing:
    sys.exit("depcheck: installed without " + ", ".join(missing) + " (add to the README's install line)")
print("depcheck: all runtime dependencies installed" +
      (f" except {', '.join(sorted(allowed_missing))}" if allowed_missing else ""))
