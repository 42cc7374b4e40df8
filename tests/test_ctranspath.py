"CTransPath: key layout of the released ctranspath.pth, save/load round trip, and clear errors on bad files."
import warnings
import pytest
import torch
from nucbook.models.ctranspath import (CTransPath, RECOMPUTED_BUFFERS, ctranspath_input, ctranspath_keys,
                                       ctranspath_released_state, load_ctranspath)

# (key, shape) pairs of the released checkpoint, read off the authors' ConvStem (3 -> C/8 -> C/4 -> C, C = 96) and
# timm 0.5.4's swin_tiny_patch4_window7_224 (window 7, heads 3/6/12/24, PatchMerging 4C -> 2C without bias)
RELEASED = {
    'patch_embed.proj.0.weight': (12, 3, 3, 3), 'patch_embed.proj.1.num_batches_tracked': (),
    'patch_embed.proj.3.weight': (24, 12, 3, 3), 'patch_embed.proj.4.running_mean': (24,),
    'patch_embed.proj.6.weight': (96, 24, 1, 1), 'patch_embed.proj.6.bias': (96,), 'patch_embed.norm.bias': (96,),
    'layers.0.blocks.0.attn.relative_position_bias_table': (169, 3),
    'layers.0.blocks.0.attn.relative_position_index': (49, 49),
    'layers.0.blocks.1.attn_mask': (64, 49, 49), 'layers.1.blocks.1.attn_mask': (16, 49, 49),
    'layers.2.blocks.3.attn_mask': (4, 49, 49),
    'layers.1.blocks.0.attn.qkv.weight': (576, 192), 'layers.2.blocks.5.mlp.fc2.weight': (384, 1536),
    'layers.0.downsample.reduction.weight': (192, 384), 'layers.2.downsample.norm.weight': (1536,),
    'layers.3.blocks.1.attn.relative_position_bias_table': (169, 24), 'layers.3.blocks.1.attn.proj.bias': (768,),
    'norm.weight': (768,),
}


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return CTransPath().eval()


def test_key_table_is_the_released_layout():
    keys = ctranspath_keys()
    assert {k: keys[k] for k in RELEASED} == RELEASED
    # 16 stem + 12 blocks x 14 + 5 masks + 3 mergings x 3 + 2 final norm
    assert len(keys) == 200
    assert not [k for k in keys if k.startswith(('head.', 'absolute_pos_embed', 'layers.3.downsample'))]
    assert 'layers.3.blocks.1.attn_mask' not in keys and 'layers.2.blocks.4.attn_mask' not in keys


def test_parameter_count_and_output(model):
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 27.5e6) < 0.1e6, n
    with pytest.raises(ValueError, match=r'expected \(B, 3, 224, 224\)'): model(torch.zeros(1, 3, 112, 112))


def test_roundtrip_in_released_layout(model, tmp_path):
    state = ctranspath_released_state(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == ctranspath_keys()
    state = {k: torch.zeros_like(v) if k.endswith(RECOMPUTED_BUFFERS) else v for k, v in state.items()}  # recomputed, so ignored
    torch.save({'model': state}, tmp_path/'ctranspath.pth')
    loaded = load_ctranspath(tmp_path/'ctranspath.pth')
    assert not loaded.training
    x = ctranspath_input(torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad(): a, b = model(x), loaded(x)
    assert a.shape == (1, 768) and torch.equal(a, b)
    # a bare state dict with a DataParallel prefix and no recomputed buffers loads too
    torch.save({'module.' + k: v for k, v in model.state_dict().items()}, tmp_path/'bare.pth')
    bare = load_ctranspath(tmp_path/'bare.pth').state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bare.items())


def test_bad_files_give_clear_errors(model, tmp_path):
    state = model.state_dict()
    with pytest.raises(FileNotFoundError, match='nothere.pth: CTransPath checkpoint not found'):
        load_ctranspath(tmp_path/'nothere.pth')
    (tmp_path/'junk.pth').write_bytes(b'\x00garbage')
    with pytest.raises(ValueError, match='junk.pth: not a readable PyTorch checkpoint'): load_ctranspath(tmp_path/'junk.pth')
    torch.save({'model': [1, 2]}, tmp_path/'list.pth')
    with pytest.raises(ValueError, match='list.pth: expected a state dict'): load_ctranspath(tmp_path/'list.pth')
    torch.save({k: v for k, v in state.items() if k != 'layers.1.downsample.reduction.weight'}, tmp_path/'missing.pth')
    with pytest.raises(ValueError, match=r'missing.pth: .*1 missing key\(s\) \(layers.1.downsample.reduction.weight\)'):
        load_ctranspath(tmp_path/'missing.pth')
    with pytest.warns(UserWarning, match='layers.1.downsample.reduction.weight'):
        load_ctranspath(tmp_path/'missing.pth', strict=False)
    torch.save({**state, 'patch_embed.proj.weight': torch.zeros(96, 3, 4, 4)}, tmp_path/'swin.pth')  # plain Swin stem
    with pytest.raises(ValueError, match=r'swin.pth: .*unexpected key\(s\) \(patch_embed.proj.weight\)'):
        load_ctranspath(tmp_path/'swin.pth')
    torch.save({**state, 'norm.weight': torch.zeros(1024)}, tmp_path/'shape.pth')
    with pytest.raises(ValueError, match=r'shape.pth: wrong tensor shapes: norm.weight \(1024,\) \(expected \(768,\)\)'):
        load_ctranspath(tmp_path/'shape.pth')


def test_input_normalisation():
    x = ctranspath_input(torch.ones(2, 3, 100, 100))
    assert x.shape == (2, 3, 224, 224)
    assert torch.allclose(x[0, :, 5, 7], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
    with pytest.raises(ValueError, match='expected \\(B, 3, H, W\\)'): ctranspath_input(torch.ones(1, 1, 224, 224))
