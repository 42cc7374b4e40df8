"""Refresh the stored outputs of the walkthrough and paper notebooks (`make outputs`).

Each notebook is run afresh with `nucbook run` at its defaults (the CPU smoke profile, synthetic data) into
`runs/stored-outputs/<name>/` (emptied first); the executed cells' outputs are copied back into `nbs/<name>.ipynb`, large PNG figures are
re-encoded as JPEG, and the notebook is cleaned with `nbdev-clean`. The Quarto site then shows those figures and tables.
The source cells are not changed, so the library stays in sync. A notebook that would exceed 1 MB is refused."""
import argparse, base64, io, json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ['10_data_tour', '10a_baseline', '10b_augment_gallery', '11_insmix', '12_nucleimix', '13_diffmix', '14_gong', '15_semantic', '16_benchmark']
MAX_BYTES = 1_000_000
JPEG_ABOVE = 40_000  # PNG figures larger than this (bytes, decoded) are stored as JPEG


def shrink_images(nb:dict) -> int:
    "Re-encode large PNG outputs as JPEG (quality 85); return the number converted."
    from PIL import Image
    n = 0
    for c in nb['cells']:
        for o in c.get('outputs', []):
            data = o.get('data', {})
            png = data.get('image/png')
            if not png or len(png) * 3 // 4 < JPEG_ABOVE: continue
            im = Image.open(io.BytesIO(base64.b64decode(png))).convert('RGB')
            buf = io.BytesIO(); im.save(buf, 'JPEG', quality=85, optimize=True)
            del data['image/png']; data['image/jpeg'] = base64.b64encode(buf.getvalue()).decode()
            n += 1
    return n


FRESH = {'16_benchmark': ['runs/benchmark-smoke']}  # folders a notebook reads or runs into besides its own (its smoke grid)


def store(name:str, runs:Path) -> dict:
    from nucbook.cli import run_notebook
    src = ROOT/'nbs'/f'{name}.ipynb'
    shutil.rmtree(runs/name, ignore_errors=True)  # a fresh run: cached rows of older code must not be shown
    for d in FRESH.get(name, []): shutil.rmtree(ROOT/d, ignore_errors=True)
    run_dir = run_notebook(src, out=runs/name, progress=False)
    ran = json.loads((run_dir/src.name).read_text())
    orig = json.loads(src.read_text())
    cells = [c for c in ran['cells'] if 'injected-parameters' not in c.get('metadata', {}).get('tags', [])]
    if len(cells) != len(orig['cells']) or any(a['source'] != b['source'] for a, b in zip(cells, orig['cells'])):
        raise SystemExit(f'{src}: the executed notebook does not match the source cell by cell; not storing')
    for a, b in zip(orig['cells'], cells):
        if a['cell_type'] == 'code': a['outputs'] = b.get('outputs', [])
    n_jpeg = shrink_images(orig)
    text = json.dumps(orig, indent=1, ensure_ascii=False) + '\n'
    if len(text.encode()) > MAX_BYTES:
        raise SystemExit(f'{src}: {len(text.encode()):,} bytes with outputs, over the 1 MB limit; make its figures smaller')
    src.write_text(text)
    subprocess.run([str(ROOT/'.venv/bin/nbdev-clean'), '--fname', str(src)], check=True, cwd=ROOT)
    params = json.loads((run_dir/'params.json').read_text())
    return dict(notebook=name, bytes=src.stat().st_size, jpeg=n_jpeg, seconds=params.get('duration_s'))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('names', nargs='*', default=NOTEBOOKS, help='notebooks to refresh (default: all walkthrough and paper notebooks)')
    ap.add_argument('--runs', default=str(ROOT/'runs'/'stored-outputs'), help='where the runs go')
    a = ap.parse_args()
    for n in a.names:
        r = store(n, Path(a.runs))
        print(f"{r['notebook']}: {r['bytes']:,} bytes, {r['jpeg']} figures as JPEG, ran {r['seconds']} s", flush=True)
