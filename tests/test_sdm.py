"""The authors' SDM UNet (DiffMix's network): key layout of the paper-size model against the authors' code, the SDM
ResBlock against its equations, the label map's role (null label = zeros, wrong shapes refused), checkpoint round trips
and loading errors."""
import pytest
import torch
import torch.nn.functional as F
from nucbook.models.sdm import (SDMResBlock, SDMUNet, SDM_PRESETS, load_sdm, save_sdm, sdm_config, sdm_label_channels)

torch.set_num_threads(1)  # pytest -n 2 on 2 cores


def _random_tiny(seed=0, **overrides):
    "A tiny SDM with every tensor non-zero (the zero-initialised convs too), so outputs depend on all weights."
    torch.manual_seed(seed)
    m = SDMUNet(**sdm_config('tiny', **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn_like(p) * 0.05)
    return m


def _label(B=2, side=16, C=6, seed=0):
    "Label maps like DiffMix's: one-hot classes (background first) and an edge channel."
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(C - 1, (B, side, side), generator=g)
    y = F.one_hot(cls, C - 1).permute(0, 3, 1, 2).float()
    edge = (cls != torch.roll(cls, 1, -1)).float()[:, None]
    return torch.cat([y, edge], 1)


# (key, shape) of the diffmix_consep model, as the authors' `UNetModel` (WeilunWang/semantic-diffusion-model,
# guided_diffusion/unet.py, identical in hvcl/DiffMix) builds it with DiffMix's CoNSeP flags: checked key by key
# against their code on the 'meta' device. The encoder is guided-diffusion's (GroupNorm in in_layers.0 / out_layers.0,
# conv in_layers.2 / out_layers.3); middle and decoder ResBlocks are SDMResBlocks (SPADE in_norm / out_norm with
# 128 hidden channels, conv in_layers.1 / out_layers.2).
KEYS_CONSEP = [
    ('time_embed.0.weight', (1024, 256)), ('input_blocks.0.0.weight', (256, 3, 3, 3)),
    ('input_blocks.1.0.in_layers.0.weight', (256,)), ('input_blocks.1.0.out_layers.3.weight', (256, 256, 3, 3)),
    ('input_blocks.17.1.qkv.weight', (3072, 1024, 1)),
    ('middle_block.0.in_norm.mlp_shared.0.weight', (128, 6, 3, 3)), ('middle_block.0.in_norm.mlp_gamma.weight', (1024, 128, 3, 3)),
    ('middle_block.0.in_layers.1.weight', (1024, 1024, 3, 3)), ('middle_block.0.emb_layers.1.weight', (2048, 1024)),
    ('middle_block.1.qkv.weight', (3072, 1024, 1)), ('middle_block.2.out_norm.mlp_beta.weight', (1024, 128, 3, 3)),
    ('middle_block.2.out_layers.2.weight', (1024, 1024, 3, 3)),
    ('output_blocks.0.0.in_norm.mlp_shared.0.weight', (128, 6, 3, 3)), ('output_blocks.0.0.in_norm.mlp_gamma.weight', (2048, 128, 3, 3)),
    ('output_blocks.0.0.out_norm.mlp_beta.bias', (1024,)), ('output_blocks.0.0.skip_connection.weight', (1024, 2048, 1, 1)),
    ('output_blocks.2.2.in_norm.mlp_shared.0.weight', (128, 6, 3, 3)),  # the up SDMResBlock closing the 8 px level
    ('output_blocks.8.1.qkv.weight', (1536, 512, 1)), ('output_blocks.17.0.skip_connection.weight', (256, 512, 1, 1)),
    ('out.0.weight', (256,)), ('out.2.weight', (6, 256, 3, 3)),
]


def test_paper_presets_match_the_authors_key_layout():
    with torch.device('meta'): m = SDMUNet(**sdm_config('diffmix_consep'))
    sd = m.state_dict()
    for k, shape in KEYS_CONSEP: assert k in sd and tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape) if k in sd else None)
    # totals of the authors' own UNetModel with these flags (num_classes 5 + instance edge; GLySAC: 4 + edge)
    assert len(sd) == 766 and sum(v.numel() for v in sd.values()) == 652_256_518
    with torch.device('meta'): g = SDMUNet(**sdm_config('diffmix_glysac')).state_dict()
    assert g['middle_block.0.in_norm.mlp_shared.0.weight'].shape == (128, 5, 3, 3) and sum(v.numel() for v in g.values()) == 652_198_918
    assert not any('norm.mlp' in k for k in sd if k.startswith('input_blocks'))  # the encoder never sees the label
    n_spade = sum(k.endswith('in_norm.mlp_shared.0.weight') for k in sd)
    assert n_spade == 2 + 18 + 5  # 2 middle, 3 x 6 decoder ResBlocks, 5 up ResBlocks
    assert SDM_PRESETS['diffmix_consep']['label_channels'] == sdm_label_channels(5) == 6
    assert SDM_PRESETS['diffmix_glysac']['label_channels'] == sdm_label_channels(4) == 5


@torch.no_grad()
def test_sdm_resblock_equations_by_hand():
    "out = skip(x) + conv2(SiLU(SPADE_out(h, y)(1 + s) + b)), h = conv1(SiLU(SPADE_in(x, y))), SPADE = GN (1 + gamma) + beta."
    torch.manual_seed(1)
    rb = SDMResBlock(32, 8, 5, out_channels=64, spade_hidden=16).eval()
    for p in rb.parameters(): p.copy_(torch.randn_like(p) * 0.1)
    x, y, e = torch.randn(2, 32, 6, 6), _label(2, 12, 5), torch.randn(2, 8)

    def spade(n, h):
        a = F.relu(F.conv2d(F.interpolate(y, size=h.shape[-2:], mode='nearest'), n.mlp_shared[0].weight, n.mlp_shared[0].bias, padding=1))
        return F.group_norm(h, 32) * (1 + F.conv2d(a, n.mlp_gamma.weight, n.mlp_gamma.bias, padding=1)) \
            + F.conv2d(a, n.mlp_beta.weight, n.mlp_beta.bias, padding=1)
    h = F.conv2d(F.silu(spade(rb.in_norm, x)), rb.in_layers[1].weight, rb.in_layers[1].bias, padding=1)
    s, b = (F.silu(e) @ rb.emb_layers[1].weight.T + rb.emb_layers[1].bias)[..., None, None].chunk(2, dim=1)
    h = F.conv2d(F.silu(spade(rb.out_norm, h) * (1 + s) + b), rb.out_layers[2].weight, rb.out_layers[2].bias, padding=1)
    torch.testing.assert_close(rb(x, y, e), F.conv2d(x, rb.skip_connection.weight, rb.skip_connection.bias) + h, atol=1e-5, rtol=0)
    # without scale-shift norm the timestep vector is added before SPADE_out
    rb2 = SDMResBlock(32, 8, 5, use_scale_shift_norm=False, spade_hidden=16).eval()
    for p in rb2.parameters(): p.copy_(torch.randn_like(p) * 0.1)
    h = F.conv2d(F.silu(spade(rb2.in_norm, x)), rb2.in_layers[1].weight, rb2.in_layers[1].bias, padding=1)
    h = h + (F.silu(e) @ rb2.emb_layers[1].weight.T + rb2.emb_layers[1].bias)[..., None, None]
    h = F.conv2d(F.silu(spade(rb2.out_norm, h)), rb2.out_layers[2].weight, rb2.out_layers[2].bias, padding=1)
    torch.testing.assert_close(rb2(x, y, e), x + h, atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_label_map_role_and_errors():
    m = _random_tiny(); x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), _label()
    out = m(x, t, y)
    assert out.shape == (2, 6, 16, 16) and m.out_channels == 6 and m.label_channels == 6 and m.image_size == 64
    assert SDMUNet.takes_label is True and m.args == sdm_config('tiny')
    assert torch.equal(m(x, t), m(x, t, torch.zeros_like(y)))  # y=None is the null label, all zeros
    assert (out - m(x, t)).abs().max() > 1e-3  # the label changes eps and v
    y2 = y.clone(); y2[:, :, :8] = y2[:, :, :8].flip(1)  # another label in the top half only
    assert (out - m(x, t, y2)).abs().max() > 1e-3
    torch.testing.assert_close(m(x[:1], t[:1], y[:1]), out[:1], atol=1e-5, rtol=0)  # each sample on its own
    with pytest.raises(ValueError, match=r'y must be label maps \(2, 6, 16, 16\).*got \(2, 5, 16, 16\)'): m(x, t, y[:, :5])
    with pytest.raises(ValueError, match='y must be label maps'): m(x, t, y[:, :, :8, :8])
    with pytest.raises(ValueError, match='y must be label maps'): m(x, t, y[:1])
    with pytest.raises(ValueError, match='multiples of 2'): m(torch.randn(1, 3, 15, 16), t[:1])
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): m(torch.randn(1, 4, 16, 16), t[:1])
    with pytest.raises(ValueError, match='t must be'): m(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match='unknown SDM preset'): sdm_config('diffmix')
    with pytest.raises(ValueError, match='do not divide'): SDMUNet(**sdm_config('tiny', attention_resolutions=(24,)))
    with pytest.raises(ValueError, match='at least 1'): sdm_label_channels(0)
    assert SDMUNet(**sdm_config('tiny', learn_sigma=False)).eval()(x, t, y).shape == (2, 3, 16, 16)
    m2 = SDMUNet(**sdm_config('tiny', resblock_updown=False, use_scale_shift_norm=False)).eval()
    assert m2(x, t, y).shape == (2, 6, 16, 16) and 'output_blocks.1.2.conv.weight' in m2.state_dict()  # conv Upsample after attention


@torch.no_grad()
def test_checkpoint_round_trip_in_the_authors_layout(tmp_path):
    src = _random_tiny(seed=3); x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 640]), _label(seed=2)
    p = save_sdm(src, tmp_path/'ema_0.9999_010000.pt')
    assert set(torch.load(p, weights_only=True)) == set(src.state_dict())  # a plain state dict, the authors' key names
    got = load_sdm(p, 'tiny')
    assert not got.training and torch.equal(got(x, t, y), src(x, t, y))
    assert not torch.equal(SDMUNet(**sdm_config('tiny')).eval()(x, t, y), src(x, t, y))  # a fresh model differs
    torch.save({k: v.half() for k, v in src.state_dict().items()}, tmp_path/'fp16.pt')
    got16 = load_sdm(tmp_path/'fp16.pt', sdm_config('tiny'))
    assert all(v.dtype == torch.float32 for v in got16.state_dict().values())
    torch.testing.assert_close(got16(x, t, y), src(x, t, y), atol=0.05, rtol=0)
    assert sorted(q.name for q in tmp_path.iterdir()) == ['ema_0.9999_010000.pt', 'fp16.pt']  # atomic: no temporary files left


def test_load_errors_name_file_and_keys(tmp_path):
    src = _random_tiny()
    sd = src.state_dict()
    sd.pop('out.2.bias'); sd.pop('middle_block.0.in_norm.mlp_beta.weight'); sd['label_emb.weight'] = torch.zeros(3, 4)
    bad = tmp_path/'bad.pt'; torch.save(sd, bad)
    with pytest.raises(ValueError) as e: load_sdm(bad, 'tiny')
    msg = str(e.value)
    assert 'bad.pt' in msg and '2 missing: middle_block.0.in_norm.mlp_beta.weight, out.2.bias' in msg
    assert '1 unexpected: label_emb.weight' in msg
    with pytest.warns(UserWarning, match='2 missing and 1 unexpected'): m = load_sdm(bad, 'tiny', strict=False)
    assert torch.equal(m.input_blocks[0][0].weight, src.input_blocks[0][0].weight)
    p = save_sdm(src, tmp_path/'good.pt')
    with pytest.raises(ValueError, match=r'good\.pt.*\n.*mis-shaped: middle_block\.0\.in_norm\.mlp_shared\.0\.weight: '
                                         r'file \(32, 6, 3, 3\), model \(32, 5, 3, 3\)'):
        load_sdm(p, sdm_config('tiny', label_channels=5), strict=False)
    with pytest.raises(FileNotFoundError, match='nope.pt'): load_sdm(tmp_path/'nope.pt', 'tiny')
    (tmp_path/'junk.pt').write_text('not a checkpoint')
    with pytest.raises(ValueError, match='junk.pt is not a readable'): load_sdm(tmp_path/'junk.pt', 'tiny')
    torch.save({'model': src.state_dict()}, tmp_path/'nested.pt')
    with pytest.raises(ValueError, match='nested.pt does not hold a state dict'): load_sdm(tmp_path/'nested.pt', 'tiny')
