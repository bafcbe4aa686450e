"""The lean forward's attention: the same result as SDPA with grouped-query heads, in fp32 and bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.modeling.forward import _attention


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_attention_equals_sdpa_with_grouped_query_heads(dtype, atol):
    torch.manual_seed(0)
    B, nh, kvh, Q, P, d = 3, 6, 2, 5, 4, 8
    g = nh // kvh
    q = torch.randn(B, nh, Q, d, dtype=dtype)
    k = torch.randn(B, kvh, P + Q, d, dtype=dtype)
    v = torch.randn(B, kvh, P + Q, d, dtype=dtype)
    # every query sees the prefix and the causal past of its row; row 1 also hides its first two columns (padding)
    mask = torch.ones(Q, P + Q, dtype=torch.bool).tril(P).expand(B, 1, Q, P + Q).clone()
    mask[1, :, :, P:P + 2] = False
    mask[1, :, torch.arange(Q), P + torch.arange(Q)] = True  # a pad row sees itself: no row is all -inf
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5, enable_gqa=True)

    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).repeat(1, 1, g, 1)
    got = _attention((q * d ** -0.5).reshape(B, kvh, g * Q, d), k, v, bias).view(B, nh, Q, d)

    torch.testing.assert_close(got, want, atol=atol, rtol=0)
