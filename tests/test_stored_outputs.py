"The walkthrough and paper notebooks keep the small outputs of their smoke run (`make outputs`), so the site shows them."
import base64, importlib.util, io, json
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('store_outputs', ROOT/'tools'/'store_outputs.py')
store_outputs = importlib.util.module_from_spec(spec); spec.loader.exec_module(store_outputs)


def _outputs(name):
    nb = json.loads((ROOT/'nbs'/f'{name}.ipynb').read_text())
    return [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]


@pytest.mark.parametrize('name', store_outputs.NOTEBOOKS)
def test_notebooks_keep_small_outputs(name):
    outs = _outputs(name)
    images = [o for o in outs if {'image/png', 'image/jpeg'} & set(o.get('data', {}))]
    assert images, f'{name}: no stored figure; run `make outputs`'
    assert (ROOT/'nbs'/f'{name}.ipynb').stat().st_size < store_outputs.MAX_BYTES


@pytest.mark.parametrize('name', ['11_insmix', '12_nucleimix', '13_diffmix', '14_gong', '15_semantic'])
def test_paper_notebook_labels_smoke_numbers(name):
    text = ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', '')) for o in _outputs(name))
    assert 'SMOKE RUN' in text and 'NOT a reproduction' in text


def test_shrink_images_turns_large_pngs_into_jpeg_and_keeps_small_ones():
    from PIL import Image
    def png(size, noise):
        a = (np.random.default_rng(0).integers(0, 255, (size, size, 3)) if noise else np.full((size, size, 3), 200)).astype(np.uint8)
        b = io.BytesIO(); Image.fromarray(a).save(b, 'PNG'); return base64.b64encode(b.getvalue()).decode()
    nb = {'cells': [{'cell_type': 'code', 'outputs': [{'data': {'image/png': png(300, True)}}, {'data': {'image/png': png(20, False)}}]}]}
    assert store_outputs.shrink_images(nb) == 1
    big, small = nb['cells'][0]['outputs']
    assert set(big['data']) == {'image/jpeg'} and set(small['data']) == {'image/png'}
    assert Image.open(io.BytesIO(base64.b64decode(big['data']['image/jpeg']))).size == (300, 300)
