"""BERT blocks of the UNITER encoder (post-LayerNorm, as in the released checkpoints)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

ACT2FN = {
    "gelu": lambda x: F.gelu(x),  # exact erf form, as UNITER was trained
    "relu": F.relu,
    "swish": F.silu,
}

# Additive mask value of the original code; large enough that exp() underflows to 0 in fp32.
MASK_VALUE = -10000.0


def additive_mask(mask01, dtype):
    """0/1 mask -> additive attention bias (0 where attended, -10000 elsewhere)."""
    return (1.0 - mask01.to(dtype)) * MASK_VALUE


class BertSelfAttention(nn.Module):
    """Multi-head self-attention. fused_attention: scaled_dot_product_attention (same
    values, less memory); False: the original's eager softmax(QK^T/sqrt(d) + bias) V."""

    def __init__(self, config, fused_attention=True):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.fused_attention = fused_attention

    def _split_heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def attention_scores(self, hidden_states):
        """Raw scaled scores QK^T/sqrt(d) [B, heads, N, N] (no mask, no dropout)."""
        q = self._split_heads(self.query(hidden_states))
        k = self._split_heads(self.key(hidden_states))
        return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)

    def forward(self, hidden_states, attention_bias, queries=None):
        """attention_bias: additive [B, 1, 1, N] (or broadcastable to [B, heads, N, N]);
        queries: the positions [B, M, D] to attend from (default: all of hidden_states)."""
        q = self._split_heads(self.query(hidden_states if queries is None else queries))
        k = self._split_heads(self.key(hidden_states))
        v = self._split_heads(self.value(hidden_states))
        if self.fused_attention:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_bias.to(q.dtype),
                dropout_p=self.dropout.p if self.training else 0.0)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            probs = self.dropout(torch.softmax(scores + attention_bias, dim=-1))
            context = torch.matmul(probs, v)
        b, _, n, _ = context.shape
        return context.transpose(1, 2).reshape(b, n, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config, fused_attention=True):
        super().__init__()
        self.self = BertSelfAttention(config, fused_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_bias, queries=None):
        residual = hidden_states if queries is None else queries
        return self.output(self.self(hidden_states, attention_bias, queries), residual)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config, fused_attention=True):
        super().__init__()
        self.attention = BertAttention(config, fused_attention)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_bias, first_token_only=False):
        """first_token_only: return [B, 1, D], the [CLS] position alone; it attends to every
        position as usual, and the other positions' outputs, which no head reads after the
        last layer, are not computed."""
        queries = hidden_states[:, :1] if first_token_only else None
        attention_output = self.attention(hidden_states, attention_bias, queries)
        return self.output(self.intermediate(attention_output), attention_output)


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))
