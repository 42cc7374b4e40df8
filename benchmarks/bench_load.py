"""Time to load one MoNuSeg tile's labels from its Aperio XML (cold: parse + rasterise) vs from the parsed-label cache.

Uses the real tile TCGA-2Z-A9J9-01A-01-TS1 (575 regions) when $NUCBOOK_DATA is set, else a synthetic XML of the
same size (575 polygons on 1000x1000). Both timings are taken side by side in this run; the cache folder is a fresh
temporary one. Prints the median of `repeats` runs and the ratio.
"""
import os, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np

def synthetic_xml(path, n=575, seed=0):
    rng = np.random.default_rng(seed)
    regs = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0, 1000), rng.uniform(0, 1000), rng.uniform(4, 12)
        a = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        regs.append(''.join(f'<Vertex X="{cx + r * np.cos(t):.1f}" Y="{cy + r * np.sin(t):.1f}"/>' for t in a))
    body = ''.join(f'<Region Id="{i}"><Vertices>{v}</Vertices></Region>' for i, v in enumerate(regs, 1))
    Path(path).write_text(f'<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Attributes/><Regions>{body}'
                          '</Regions></Annotation></Annotations>')

def main(repeats=5):
    tmp = Path(tempfile.mkdtemp())
    os.environ['NUCBOOK_CACHE'] = str(tmp / 'cache')
    from nucbook.data.datasets import xml_labels, read_image, load_dataset, MONUSEG_XY_OFFSET
    real = os.environ.get('NUCBOOK_DATA')
    xml = Path(real or '') / 'monuseg' / 'MoNuSegTestData' / 'TCGA-2Z-A9J9-01A-01-TS1.xml'
    if not (real and xml.exists()):
        xml = tmp / 'synthetic.xml'; synthetic_xml(xml); src = 'synthetic XML (575 polygons)'
    else: src = f'{xml.name} (real)'
    shape = (1000, 1000)
    cold, cached = [], []
    for i in range(repeats):
        t = time.perf_counter(); a = xml_labels(xml, shape, xy_offset=MONUSEG_XY_OFFSET, cache=False); cold.append(time.perf_counter() - t)
        if i == 0: xml_labels(xml, shape, xy_offset=MONUSEG_XY_OFFSET) # fill the cache once
        t = time.perf_counter(); b = xml_labels(xml, shape, xy_offset=MONUSEG_XY_OFFSET); cached.append(time.perf_counter() - t)
        assert np.array_equal(a['inst_map'], b['inst_map'])
    c, k = statistics.median(cold), statistics.median(cached)
    print(f'labels of one MoNuSeg tile, {src}, {a["stats"]["n_instances"]} nuclei, median of {repeats}:')
    print(f'  from XML (parse + rasterise): {c * 1000:8.1f} ms')
    print(f'  from cache (.npz):            {k * 1000:8.1f} ms')
    print(f'  speed-up:                     {c / k:8.1f} x')
    if real and (Path(real) / 'monuseg').exists(): # whole sample (image read + Sample checks) both ways
        t = time.perf_counter(); load_dataset('monuseg2018', 'test', cache=False); full_cold = time.perf_counter() - t
        load_dataset('monuseg2018', 'test')
        t = time.perf_counter(); load_dataset('monuseg2018', 'test'); full_cached = time.perf_counter() - t
        print(f'  all 14 test tiles as Samples: {full_cold:.2f} s from XML, {full_cached:.2f} s with the cache')

if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
