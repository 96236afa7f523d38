"""The model: shapes, where image embeddings land, masking, causality, generation, kernels."""

import pytest
import torch

from model import VLM, ModelConfig, configure_optimizer

IMAGE = 3


def tiny_config(**overrides):
    settings = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                    image_size=16, patch_size=8, vit_depth=1, vit_width=16, vit_heads=2, image_token_id=IMAGE)
    settings.update(overrides)
    return ModelConfig(**settings)


def tiny_batch(seed=0, B=3, T=40, n_images=2):
    """Rows 0 and 1 each start with one image (4 placeholders); row 2 is text."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(4, 97, (B, T), generator=g)
    idx[0, :4] = IMAGE
    idx[1, 10:14] = IMAGE
    targets = torch.randint(4, 97, (B, T), generator=g)
    targets[0, :3] = -1
    images = torch.randint(0, 256, (n_images, 16, 16, 3), dtype=torch.uint8, generator=g)
    return idx, targets, images


def test_shapes_and_parameter_groups():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    idx, targets, images = tiny_batch()
    loss, token_losses = model(idx, targets, images)
    assert loss.shape == () and token_losses.shape == idx.shape
    assert model.logits(idx, images).shape == (3, 40, 97)
    assert model.vision(images).shape == (2, 4, 32)
    assert model.num_params("decoder") + model.num_params("vision") == model.num_params("all")


def test_image_embeddings_land_exactly_at_placeholders():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    idx, _, images = tiny_batch()
    x = model.embed(idx, images)
    image_tokens = model.vision(images)
    assert torch.equal(x[0, :4], image_tokens[0])  # image 0 -> the first 4 placeholders
    assert torch.equal(x[1, 10:14], image_tokens[1])  # image 1 -> the next 4
    is_text = idx != IMAGE
    assert torch.equal(x[is_text], model.wte(idx)[is_text])
    with pytest.raises(ValueError, match="8 <\\|image\\|> placeholders but 1 images"):
        model.embed(idx, images[:1])


def test_no_loss_on_masked_positions():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    idx, targets, images = tiny_batch()
    targets[1, 5:20] = -1
    loss, token_losses = model(idx, targets, images)
    assert (token_losses[targets == -1] == 0).all() and (token_losses[targets != -1] > 0).all()
    assert torch.allclose(loss, token_losses.sum() / (targets != -1).sum())
    # what stands at a masked target cannot change the loss or the gradient
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    other = targets.clone()
    other[targets == -1] = -1
    loss2, _ = model(idx, other, images)
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    # image placeholders as targets are the loader's job to mask; all-masked gives 0, not NaN
    zero, _ = model(idx, torch.full_like(targets, -1), images)
    assert zero.item() == 0.0


def test_causality_future_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    idx, _, images = tiny_batch()
    changed = idx.clone()
    changed[:, 30:] = torch.randint(4, 97, (3, 10))
    a, b = model.logits(idx, images), model.logits(changed, images)
    assert torch.allclose(a[:, :30], b[:, :30], atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_patch_encoder_is_bidirectional_over_patches():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    images = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8)
    changed = images.clone()
    changed[0, 8:, 8:] = 0  # only the last patch
    a, b = model.vision(images), model.vision(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first patch token sees the last patch


def test_text_only_batches_give_the_encoder_zero_gradients():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    idx, targets, _ = tiny_batch()
    idx[idx == IMAGE] = 10
    loss, _ = model(idx, targets, None)
    loss.backward()
    for p in model.vision.parameters():
        assert p.grad is not None and (p.grad == 0).all()


def test_generate_with_kv_cache_equals_full_recompute():
    torch.manual_seed(0)
    model = VLM(tiny_config())
    idx, _, images = tiny_batch()
    prompt = idx[:2, :16]
    new = model.generate(prompt, images, max_new_tokens=8)
    seq = prompt
    for _ in range(8):  # greedy decoding the slow way
        next_token = model.logits(seq, images)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(new, seq[:, 16:])
    stop = int(new[0, 2])
    stopped = model.generate(prompt, images, max_new_tokens=8, stop_id=stop)
    assert (stopped[0, 2:] == stop).all()
    g = torch.Generator().manual_seed(1)
    sampled = model.generate(prompt, images, max_new_tokens=5, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (2, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_equals_kernels_off(dtype):
    torch.manual_seed(0)
    reference = VLM(tiny_config(qk_norm=True))
    torch.manual_seed(0)
    fused = VLM(tiny_config(use_kernels=True, qk_norm=True))
    fused.load_state_dict(reference.state_dict())
    idx, targets, images = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss_ref, tl_ref = reference(idx, targets, images)
        loss_k, tl_k = fused(idx, targets, images)
    loss_ref.backward()
    loss_k.backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss_k, loss_ref, **tol)
    torch.testing.assert_close(tl_k, tl_ref, **tol)
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().clamp(min=1e-8)
        err = (p.grad - q.grad).abs().max() / scale
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), (name, err)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_the_toy_model_trains_with_and_without_qk_norm(qk_norm):
    torch.manual_seed(0)
    model = VLM(tiny_config(qk_norm=qk_norm))
    assert hasattr(model.blocks[0].attn, "q_norm") == qk_norm
    optimizer = configure_optimizer(model, 1e-2, 0.0, (0.9, 0.95), "cpu")
    idx, targets, images = tiny_batch()
    losses = []
    for _ in range(15):
        loss, _ = model(idx, targets, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_qk_norm_normalises_all_heads_queries_and_keys_together():
    # OpenLM's qk-norm is one LayerNorm over the whole query (key) projection: scaling every
    # query weight by a constant then changes nothing, while without qk-norm it sharpens attention.
    for qk_norm in (False, True):
        torch.manual_seed(0)
        model = VLM(tiny_config(qk_norm=qk_norm))
        idx, _, images = tiny_batch()
        before = model.logits(idx, images)
        attn = model.blocks[0].attn
        with torch.no_grad():
            attn.qkv.weight[:attn.n_head * attn.head_dim] *= 7.0
        assert torch.allclose(model.logits(idx, images), before, atol=1e-4) == qk_norm
    assert attn.q_norm.weight.shape == (4 * 8,) and attn.k_norm.weight.shape == (2 * 8,) and attn.q_norm.bias is None


@pytest.mark.parametrize("n_kv_head", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_attention_equals_sdpa(causal, n_kv_head):
    # the CPU's explicit attention must compute what the fused kernels compute on CUDA
    from model import attention
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, n_kv_head, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = attention(q, k, v, causal)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                enable_gqa=n_kv_head != 4)
    assert torch.allclose(ours, expected, atol=1e-12)
    ours.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected.sum().backward()
    assert all(torch.allclose(a, t.grad, atol=1e-12) for a, t in zip(grads, (q, k, v)))


def test_cpu_attention_with_a_mask_equals_sdpa():
    # the packed-conversations mask: the CPU's form and the fused kernels' (CUDA) agree
    from model import attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9])
    mask = (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1) & torch.ones(9, 9, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention(q, k, v, causal=True, mask=mask), expected, atol=1e-12)
    assert torch.allclose(attention(q[1:], k[1:], v[1:], causal=True), expected[1:], atol=1e-12)  # one segment


def test_packed_documents_read_as_if_each_were_alone():
    # Two image documents and a text tail packed into one row, segments 0, 1, 2: each one's
    # per-token losses and its share of the gradient equal those of the document alone in a row.
    torch.manual_seed(0)
    model = VLM(tiny_config(vit_depth=0)).double()
    g = torch.Generator().manual_seed(1)
    lengths = [13, 17, 10]
    docs = [torch.randint(4, 97, (n,), generator=g) for n in lengths]
    docs[0][:4], docs[1][:4] = IMAGE, IMAGE
    targets = [torch.randint(4, 97, (n,), generator=g) for n in lengths]
    targets[1][:6] = -1
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=g)
    packed_x, packed_y = torch.cat(docs)[None], torch.cat(targets)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    loss, packed_losses = model(packed_x, packed_y, images, segments)
    loss.backward()
    packed_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    start, summed = 0, 0.0
    for i, n in enumerate(lengths):
        doc_loss, alone = model(docs[i][None], targets[i][None], images[i:i + 1] if i < 2 else None)
        assert torch.allclose(packed_losses[0, start:start + n], alone[0], rtol=1e-6)
        summed = summed + doc_loss * (targets[i] != -1).sum()  # each mean back to a sum
        start += n
    (summed / (packed_y != -1).sum()).backward()
    assert torch.allclose(model.lm_head.weight.grad, packed_grad, rtol=1e-5, atol=1e-8)  # float32 logits
    # without segments the second document reads the first: its losses change
    _, unmasked = model(packed_x, packed_y, images)
    assert not torch.allclose(unmasked[0, 13:30], packed_losses[0, 13:30])
