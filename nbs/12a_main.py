# %% [markdown]
# # Entry point
#
# > The package entry point: `python -m uotcrowd ...` is the `uotcrowd` command.

# %%
#| default_exp __main__

# %% [markdown]
# The console script `uotcrowd` (declared in `settings.ini`) and `python -m uotcrowd` both call
# `uotcrowd.cli.main`; the second form works without the script on the `PATH`, e.g. inside a virtual
# environment that was not activated. For `torchrun`, which needs a module, use
# `torchrun ... -m uotcrowd.cli train ...` or `torchrun ... -m uotcrowd train ...`.

# %%
#| export
import sys
from uotcrowd.cli import main

if __name__ == '__main__' and '__file__' in globals(): sys.exit(main())

# %%
import subprocess

# %%
out = subprocess.run([sys.executable, '-m', 'uotcrowd', '--help'], capture_output=True, text=True)
assert out.returncode == 0 and 'usage: uotcrowd' in out.stdout, out.stderr
for cmd in ('train', 'eval', 'predict', 'demo'): assert cmd in out.stdout

# %%
#| hide
import nbdev
nbdev.nbdev_export()
