"""Every runtime dependency the installed ftte-fleet declares is installed, except those named
on the command line.

scripts/pi-check runs it after the README's install commands: on armhf numpy must come from
Debian's python3-numpy through the --system-site-packages venv (PyPI has no armv7 numpy wheel),
and a dependency that pip could not provide fails here with its name, instead of as an
ImportError somewhere later. Extras (hub, test) are not runtime dependencies.
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
