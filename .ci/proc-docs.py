"""Process the notebooks for the Quarto site exactly as `nbdev-proc-nbs` does, minus its attempt to install Quarto
(which needs sudo and the internet). Any docs-processing error (e.g. a cell that fails when the docs build executes
imports and exported cells) exits non-zero."""
from nbdev.config import get_config
from nbdev.quarto import nbdev_sidebar, proc_nbs, refresh_quarto_yml
import nbdev.doclinks

if __name__ == '__main__':  # proc_nbs starts worker processes that re-import this file
    cfg = get_config()
    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    proc_nbs(cfg.nbs_path)
    print('docs processing: ok')
