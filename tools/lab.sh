#!/usr/bin/env bash
# `make lab`: JupyterLab from .venv on loopback (127.0.0.1), rooted at the repository, opening nbs/.
# Notebooks name the `python3` kernel; the venv's own python3 kernel spec (shipped by ipykernel) runs the venv's
# python, so nucbook imports. JUPYTER_PREFER_ENV_PATH=1 puts the venv's kernel specs, lab extensions (the
# ipywidgets manager, jupyterlab_widgets) and config before ~/.local/share/jupyter and ~/.jupyter ones.
# Extra arguments go to `jupyter lab`, e.g. `make lab LAB_ARGS="--no-browser --port=8899"`; one naming a default
# below (--ip, --ServerApp.root_dir, --LabApp.default_url) replaces it (traitlets refuses an option given twice).
# tests/test_lab.py starts the server through this script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lab="$root/.venv/bin/jupyter-lab"
[ -x "$lab" ] || { echo "tools/lab.sh: $lab not found: run 'make venv' (jupyterlab is pinned in pyproject.toml)" >&2; exit 1; }
export JUPYTER_PREFER_ENV_PATH=1 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
# the Makefile exports MPLBACKEND=Agg for batch runs; in the lab it would hide every figure (plt.show, browse()),
# so let ipykernel pick its inline backend
unset MPLBACKEND
defaults=(--ip=127.0.0.1 "--ServerApp.root_dir=$root" --LabApp.default_url=/lab/tree/nbs)
# containers often run as root, which jupyter refuses without --allow-root (the server stays on loopback, with a token)
[ "$(id -u)" != 0 ] || defaults+=(--allow-root)
keep=()
for d in "${defaults[@]}"; do
  given=0
  for a in "$@"; do [ "${a%%=*}" = "${d%%=*}" ] && given=1; done
  [ $given = 1 ] || keep+=("$d")
done
exec "$lab" "${keep[@]}" "$@"
