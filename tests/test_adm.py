"ADM (guided-diffusion) UNet: shapes, the 256x256 uncond checkpoint key layout, timestep embedding, checkpoint loading."
import math
import pytest
import torch
import torch.nn.functional as F
from nucbook.models.adm import ADMAttention, ADMResBlock, ADMUNet, ADM_256_UNCOND, ADM_PRESETS, adm_config, load_adm, save_adm, timestep_embedding

torch.set_num_threads(1)  # pytest -n 2 on 2 cores


def _random_tiny(seed=0, **overrides):
    "A tiny model with every tensor non-zero (the zero-initialised convs too), so outputs depend on all weights."
    torch.manual_seed(seed)
    m = ADMUNet(**adm_config('tiny', **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn_like(p) * 0.05)
    return m


@torch.no_grad()
def test_tiny_forward_shapes():
    m = ADMUNet(**ADM_PRESETS['tiny']).eval()
    assert m(torch.randn(2, 3, 32, 32), torch.tensor([0, 999])).shape == (2, 6, 32, 32)
    assert m(torch.randn(1, 3, 64, 16), torch.tensor([12.5])).shape == (1, 6, 64, 16)
    assert m(torch.randn(3, 3, 32, 32), 5).shape == (3, 6, 32, 32)  # a scalar t is broadcast over the batch
    assert ADMUNet(**adm_config('tiny', learn_sigma=False))(torch.randn(1, 3, 32, 32), torch.tensor([1])).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match='multiples of 2'): m(torch.randn(1, 3, 31, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): m(torch.randn(1, 4, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match='t must be'): m(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]))


def test_timestep_embedding_by_hand():
    # d = 6: h = 3, omega_i = 10000**(-i/3) = 1, 0.0464159, 0.00215443; cosines first, then sines
    w = [1., 10000 ** (-1 / 3), 10000 ** (-2 / 3)]
    e = timestep_embedding(torch.tensor([0, 3, 250.5]), 6)
    for row, t in zip(e, (0, 3, 250.5)):
        hand = [math.cos(t * wi) for wi in w] + [math.sin(t * wi) for wi in w]
        assert torch.allclose(row, torch.tensor(hand), atol=1e-5), (t, row, hand)
    assert e[0].tolist() == [1., 1., 1., 0., 0., 0.]
    e7 = timestep_embedding(torch.tensor([3]), 7)  # odd d: same 6 values then a zero
    assert e7.shape == (1, 7) and e7[0, 6] == 0 and torch.allclose(e7[0, :6], e[1])
    with pytest.raises(ValueError, match='1-D'): timestep_embedding(torch.zeros(2, 1), 8)


@torch.no_grad()
def test_resblock_scale_shift_by_hand():
    "out = x + conv2(SiLU(GN2(h) (1 + s) + b)), h = conv1(SiLU(GN1(x))), (s, b) = Linear(SiLU(e)) split scale first."
    torch.manual_seed(0)
    rb = ADMResBlock(32, 8).eval()
    for p in rb.parameters(): p.copy_(torch.randn_like(p) * 0.1)
    x, e = torch.randn(2, 32, 4, 4), torch.randn(2, 8)
    gn1, conv1, lin, gn2, conv2 = rb.in_layers[0], rb.in_layers[2], rb.emb_layers[1], rb.out_layers[0], rb.out_layers[3]
    s, b = (F.silu(e) @ lin.weight.T + lin.bias)[..., None, None].chunk(2, dim=1)
    h = F.conv2d(F.silu(F.group_norm(x, 32, gn1.weight, gn1.bias)), conv1.weight, conv1.bias, padding=1)
    h = F.group_norm(h, 32, gn2.weight, gn2.bias) * (1 + s) + b
    assert torch.allclose(rb(x, e), x + F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1), atol=1e-5)


@torch.no_grad()
def test_attention_uses_guided_diffusion_head_order():
    "qkv channels are [q0 k0 v0 | q1 k1 v1] per head (legacy order), which is what the pretrained weights assume."
    at = ADMAttention(32, num_head_channels=16).eval()
    at.qkv.weight.zero_(); at.qkv.bias.zero_()  # q = k = 0: uniform attention, output = v (constant here)
    at.qkv.bias[32:48] = 1.; at.qkv.bias[80:96] = 2.  # v of head 0 and head 1 in the legacy layout
    at.proj_out.weight.copy_(torch.eye(32)[..., None]); at.proj_out.bias.zero_()
    x = torch.randn(1, 32, 3, 5)
    v = torch.tensor([1.] * 16 + [2.] * 16)[None, :, None, None]
    assert torch.allclose(at(x), x + v, atol=1e-6)  # the other (q|k|v across heads) order would give 0 for head 0
    # logits k^T q / sqrt(c): one head of c = 32 channels, two positions; x = +1 / -1 everywhere, so GN(x) = n = +-a with
    # a = 1/sqrt(1 + eps). With q = alpha n, k = v = n: logits +-L, L = alpha c a^2 / sqrt(c), and attn = tanh(L) n.
    at = ADMAttention(32).eval()
    alpha, c, a = 0.1, 32, 1 / math.sqrt(1 + 1e-5)
    at.qkv.weight.copy_(torch.cat([alpha * torch.eye(32), torch.eye(32), torch.eye(32)])[..., None]); at.qkv.bias.zero_()
    at.proj_out.weight.copy_(torch.eye(32)[..., None]); at.proj_out.bias.zero_()
    x = torch.tensor([1., -1.])[None, None, None].expand(1, 32, 1, 2)
    L = alpha * c * a * a / math.sqrt(c)
    assert torch.allclose(at(x), x + math.tanh(L) * a * x, atol=1e-5)


# (key, shape) of the 256x256 uncond model, worked out from the architecture (C0 = 256, mult 1,1,2,2,4,4, time
# vector 4*C0 = 1024, scale-shift doubles emb_layers, attention at 32/16/8 px = levels 3-5, heads of 64 channels).
# input_blocks: 0 conv | 1,2 res 3 down | 4,5 6 down | 7,8 9 down | 10,11 12 down | 13,14 15 down | 16,17
# output_blocks: 3 per level from the deepest: 0-2 at 8 px (1024 ch), ..., 15-17 at 256 px (256 ch)
KEYS_256 = [
    ('time_embed.0.weight', (1024, 256)), ('time_embed.2.weight', (1024, 1024)),
    ('input_blocks.0.0.weight', (256, 3, 3, 3)), ('input_blocks.0.0.bias', (256,)),
    ('input_blocks.1.0.in_layers.0.weight', (256,)), ('input_blocks.1.0.in_layers.2.weight', (256, 256, 3, 3)),
    ('input_blocks.1.0.emb_layers.1.weight', (512, 1024)), ('input_blocks.1.0.out_layers.3.weight', (256, 256, 3, 3)),
    ('input_blocks.3.0.in_layers.2.weight', (256, 256, 3, 3)),  # down ResBlock
    ('input_blocks.7.0.skip_connection.weight', (512, 256, 1, 1)), ('input_blocks.7.0.emb_layers.1.weight', (1024, 1024)),
    ('input_blocks.10.1.norm.weight', (512,)), ('input_blocks.10.1.qkv.weight', (1536, 512, 1)),
    ('input_blocks.10.1.proj_out.weight', (512, 512, 1)), ('input_blocks.13.0.skip_connection.weight', (1024, 512, 1, 1)),
    ('input_blocks.17.1.qkv.weight', (3072, 1024, 1)),
    ('middle_block.0.in_layers.2.weight', (1024, 1024, 3, 3)), ('middle_block.1.qkv.bias', (3072,)),
    ('middle_block.2.emb_layers.1.weight', (2048, 1024)),
    ('output_blocks.0.0.in_layers.0.weight', (2048,)), ('output_blocks.0.0.skip_connection.weight', (1024, 2048, 1, 1)),
    ('output_blocks.2.2.in_layers.2.weight', (1024, 1024, 3, 3)),  # up ResBlock closing the 8 px level
    ('output_blocks.5.0.skip_connection.weight', (1024, 1536, 1, 1)),  # 1024 + input_blocks.12 (512)
    ('output_blocks.6.0.skip_connection.weight', (512, 1536, 1, 1)), ('output_blocks.8.0.skip_connection.weight', (512, 1024, 1, 1)),
    ('output_blocks.8.1.qkv.weight', (1536, 512, 1)),
    ('output_blocks.17.0.skip_connection.weight', (256, 512, 1, 1)),
    ('out.0.weight', (256,)), ('out.2.weight', (6, 256, 3, 3)), ('out.2.bias', (6,)),
]

def test_256_uncond_key_layout():
    with torch.device('meta'): m = ADMUNet(**ADM_256_UNCOND)
    sd = m.state_dict()
    assert all(v.is_meta for v in sd.values())
    for k, shape in KEYS_256: assert k in sd and tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape) if k in sd else None)
    assert len(m.input_blocks) == 18 and len(m.output_blocks) == 18
    assert sum(k.endswith('.qkv.weight') for k in sd) == 16  # 2*3 encoder + 1 middle + 3*3 decoder
    assert not any('upd' in k or k.startswith('input_blocks.8.1') for k in sd)  # no attention at 64 px
    assert not any(k.startswith('input_blocks.3.0.skip_connection') for k in sd)
    # total of guided-diffusion's own UNetModel built with these flags (checked against its unet.py on 'meta')
    assert sum(v.numel() for v in sd.values()) == 552_814_086 and len(sd) == 566


@torch.no_grad()
def test_save_load_roundtrip_and_fp16(tmp_path):
    src = _random_tiny()
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 800])
    p = save_adm(src, tmp_path/'adm.pt')
    got = load_adm(p, 'tiny')
    assert not got.training and torch.equal(got(x, t), src(x, t))
    assert not torch.equal(ADMUNet(**adm_config('tiny')).eval()(x, t), src(x, t))  # a fresh model differs
    torch.save({k: v.half() for k, v in src.state_dict().items()}, tmp_path/'adm16.pt')
    got16 = load_adm(tmp_path/'adm16.pt', adm_config('tiny'))
    assert all(v.dtype == torch.float32 for v in got16.state_dict().values())
    assert torch.allclose(got16(x, t), src(x, t), atol=0.05)


def test_load_errors_name_file_and_keys(tmp_path):
    src = _random_tiny()
    sd = src.state_dict()
    sd.pop('out.2.bias'); sd.pop('middle_block.1.qkv.weight'); sd['label_emb.weight'] = torch.zeros(10, 128)
    bad = tmp_path/'bad.pt'; torch.save(sd, bad)
    with pytest.raises(ValueError) as e: load_adm(bad, 'tiny')
    msg = str(e.value)
    assert 'bad.pt' in msg and '2 missing: middle_block.1.qkv.weight, out.2.bias' in msg and '1 unexpected: label_emb.weight' in msg
    with pytest.warns(UserWarning, match='2 missing and 1 unexpected'): m = load_adm(bad, 'tiny', strict=False)
    assert torch.equal(m.input_blocks[0][0].weight, src.input_blocks[0][0].weight)
    p = save_adm(src, tmp_path/'good.pt')
    with pytest.raises(ValueError, match=r'good\.pt.*\n.*mis-shaped: input_blocks\.0\.0\.bias: file \(32,\), model \(64,\)'):
        load_adm(p, adm_config('tiny', model_channels=64), strict=False)
    with pytest.raises(FileNotFoundError, match='nope.pt'): load_adm(tmp_path/'nope.pt', 'tiny')
    (tmp_path/'junk.pt').write_text('not a checkpoint')
    with pytest.raises(ValueError, match='junk.pt is not a readable'): load_adm(tmp_path/'junk.pt', 'tiny')
    torch.save([1, 2], tmp_path/'list.pt')
    with pytest.raises(ValueError, match='list.pt does not hold a state dict'): load_adm(tmp_path/'list.pt', 'tiny')
    with pytest.raises(ValueError, match='unknown ADM preset'): load_adm(p, 'huge')


def test_args_rebuild_the_same_network():
    m = _random_tiny(channel_mult=[1, 2, 2])
    assert m.args == adm_config('tiny', channel_mult=(1, 2, 2))  # tuples, as adm_config gives them
    twin = ADMUNet(**m.args).eval(); twin.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): assert torch.equal(twin(x, torch.tensor([9])), m(x, torch.tensor([9])))
