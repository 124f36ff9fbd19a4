"""UNITER: a single-stream transformer over [text tokens | image regions]."""
import copy
import json
import logging
import math

import torch
from torch import nn

from utils.config import ConfigError
from utils.errors import CheckpointMismatchError, load_json

from .alignment import AttentionView, encoder_layers
from .layer import ACT2FN, BertLayer, BertPooler, additive_mask

logger = logging.getLogger(__name__)


_MODEL_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size")
_MODEL_PROBS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


class UniterConfig:
    """Model hyper-parameters, as a JSON file such as config/uniter-base.json holds them.
    Every key the model reads is checked here, once: a missing or wrong one is a
    ConfigError naming the source and the key."""
    DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02}

    def __init__(self, vocab_size, **values):
        """``vocab_size`` and any of :data:`DEFAULTS` (the rest keep their defaults)."""
        self.__dict__.update({**self.DEFAULTS, "vocab_size": vocab_size, **values})
        self.check("UniterConfig")

    def check(self, source):
        values = self.__dict__

        def fail(key, expected):
            got = json.dumps(values[key]) if key in values else "nothing"
            raise ConfigError(f"{source}: {key} must be {expected}, got {got}")

        for key in _MODEL_INTS:
            value = values.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, "a positive integer")
        for key in _MODEL_PROBS + ("initializer_range",):
            value = values.get(key)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0 or (key in _MODEL_PROBS and value >= 1)):
                fail(key, "a number in [0, 1)" if key in _MODEL_PROBS else "a non-negative number")
        if values.get("hidden_act") not in ACT2FN:
            fail("hidden_act", f"one of {', '.join(sorted(ACT2FN))}")
        if values["hidden_size"] % values["num_attention_heads"]:
            fail("hidden_size", f"a multiple of num_attention_heads ({values['num_attention_heads']})")

    @classmethod
    def from_dict(cls, values, source="model config"):
        """The config of a JSON object ``values`` (checked; ``source`` names it in errors)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source} must be a JSON object, got {type(values).__name__}")
        config = cls.__new__(cls)
        config.__dict__.update(values)
        config.check(source)
        return config

    @classmethod
    def from_json_file(cls, json_file):
        return cls.from_dict(load_json(json_file, "model config", ConfigError), f"model config {json_file}")

    def to_dict(self):
        return copy.deepcopy(self.__dict__)

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self):
        return self.to_json_string()


def normalise_checkpoint_keys(state_dict):
    """Map pre-training checkpoint names onto ours: LayerNorm gamma/beta, 'bert.' prefix."""
    has_bert_prefix = any(k.startswith("bert.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if has_bert_prefix:
            if not key.startswith("bert."):
                continue
            key = key[len("bert."):]
        if key.endswith(".gamma"):
            key = key[:-len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[:-len("beta")] + "bias"
        out[key] = value
    return out


class UniterPreTrainedModel(nn.Module):
    """Weight initialisation and checkpoint loading shared by the UNITER models."""

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, UniterConfig):
            raise ValueError(f"{type(self).__name__} needs a UniterConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def from_pretrained(cls, config_file, state_dict, *inputs, **kwargs):
        """Build the model from a config (path or UniterConfig) and load a state dict.

        Accepts retrieval checkpoints and pre-training checkpoints (extra heads are
        ignored). Missing and unexpected keys are logged; a shape that does not fit the
        config raises CheckpointMismatchError naming the first such key.
        """
        config = config_file if isinstance(config_file, UniterConfig) else UniterConfig.from_json_file(config_file)
        model = cls(config, *inputs, **kwargs)
        state_dict = normalise_checkpoint_keys(state_dict)
        own = model.state_dict()
        for key, value in state_dict.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointMismatchError(
                    f"checkpoint tensor {key} has shape {tuple(value.shape)} but the model config "
                    f"needs {tuple(own[key].shape)}; use the model config the checkpoint was trained with")
        if not state_dict:
            logger.info("%s starts from random initialisation (no checkpoint)", cls.__name__)
            return model
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys:
            logger.info("Weights of %s not initialized from the checkpoint: %s",
                        cls.__name__, _some_names(result.missing_keys))
        if result.unexpected_keys:
            logger.info("Weights from the checkpoint not used in %s: %s",
                        cls.__name__, _some_names(result.unexpected_keys))
        return model


def _some_names(names, shown=8):
    """The first ``shown`` names and how many more: a checkpoint of another layout would
    otherwise log hundreds of them on one line."""
    listed = ", ".join(names[:shown])
    return f"{len(names)}: {listed}" + (f", ... and {len(names) - shown} more" if len(names) > shown else "")


class UniterTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
                      + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(embeddings))


class UniterImageEmbeddings(nn.Module):
    def __init__(self, config, img_dim):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        # Used by UNITER pre-training (masked regions) only; kept so checkpoints load as they are.
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings):
        # features arrive as stored (float16); compute in the weights' dtype
        dtype = self.img_linear.weight.dtype
        transformed_im = self.img_layer_norm(self.img_linear(img_feat.to(dtype)))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat.to(dtype)))
        return self.dropout(self.LayerNorm(transformed_im + transformed_pos + type_embeddings))


class UniterEncoder(nn.Module):
    """Stack of BERT layers; built with alignment objectives (model/alignment.py, e.g. IAIS),
    it also computes their losses on the self-attention of the layers they read.

    fused_attention: fused attention kernels in every layer and the IAIS attention blocks
    from one softmax per key mask; False: the original's eager attention and four passes.
    Both give the same values.
    """

    def __init__(self, config, fused_attention=True, objectives=()):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, fused_attention)
                                    for _ in range(config.num_hidden_layers)])
        self.fused_attention = fused_attention
        self.objectives = tuple(objectives)

    def forward(self, input_, attention_mask, txt_attn_mask=None, img_attn_mask=None, max_tl=0,
                output_all_encoded_layers=True, pairs_num=3, first_token_only=False, align=None,
                objectives=None, mask_counts=None):
        """input_ [B, N, D]; attention_mask: 0/1 [B, N]. Returns (layers, losses): the
        hidden states [B, N, D] after each layer (the last one alone without
        output_all_encoded_layers), and a dict of loss terms.

        align ('L' text or 'V' image, or None: losses is {}): whose self-attention the
        objectives (this encoder's, or ``objectives`` for this call) align, on the positives
        (rows 0, pairs_num, 2*pairs_num, ...) and the hidden states entering each
        objective's layer; txt_attn_mask/img_attn_mask are their 0/1 position masks [P, N],
        max_tl the padded text length and mask_counts (words, boxes) the ones of each mask
        row as ints (read off the masks when None). IAIS gives losses['self_attn_loss'].
        first_token_only: the last layer computes the [CLS] position only ([B, 1, D]).
        """
        by_layer = encoder_layers(self.objectives if objectives is None else objectives,
                                  len(self.layer)) if align else {}
        bias = additive_mask(attention_mask[:, None, None, :], input_.dtype)
        hidden_states = input_
        all_layers, losses = [], {}
        last = len(self.layer) - 1
        for i, layer_module in enumerate(self.layer):
            if i in by_layer:
                view = self._attention_view(layer_module, hidden_states[::pairs_num], txt_attn_mask, img_attn_mask,
                                            max_tl, align, mask_counts)
                for objective in by_layer[i]:
                    losses.update(objective(view))
            hidden_states = layer_module(hidden_states, bias, first_token_only and i == last)
            if output_all_encoded_layers:
                all_layers.append(hidden_states)
        if not output_all_encoded_layers:
            all_layers.append(hidden_states)
        return all_layers, losses

    def _attention_view(self, layer_module, positives, txt_mask, img_mask, max_tl, align, mask_counts):
        if mask_counts is None:
            mask_counts = (tuple(txt_mask.sum(1).tolist()), tuple(img_mask.sum(1).tolist()))
        scores = layer_module.attention.self.attention_scores(positives)
        return AttentionView(scores, txt_mask, img_mask, max_tl, *mask_counts, side=align,
                             fused=self.fused_attention)


class UniterModel(UniterPreTrainedModel):
    """Embeddings of [text | image], the encoder and the pooler (fused_attention as in
    :class:`UniterEncoder`)."""

    def __init__(self, config, img_dim, fused_attention=True, objectives=()):
        super().__init__(config)
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, img_dim)
        self.encoder = UniterEncoder(config, fused_attention, objectives)
        self.pooler = BertPooler(config)
        self.apply(self.init_weights)

    def _compute_img_embeddings(self, img_feat, img_pos_feat, img_type_ids=None):
        if img_type_ids is None:
            img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        type_embeddings = self.embeddings.token_type_embeddings(img_type_ids)
        return self.img_embeddings(img_feat, img_pos_feat, type_embeddings)

    def embed(self, input_ids, position_ids, img_feat, img_pos_feat, gather_index=None,
              txt_type_ids=None, img_type_ids=None):
        """The encoder's input [B, N, D]: text embeddings [B, T, D] then image embeddings
        [B, M, D] (padded layout), or with gather_index [B, N] each row packed as
        [its text | its boxes | padding] (compact layout)."""
        txt_emb = self.embeddings(input_ids, position_ids, txt_type_ids)
        img_emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_type_ids)
        joint = torch.cat([txt_emb, img_emb], dim=1)
        if gather_index is None:
            return joint
        index = gather_index.unsqueeze(-1).expand(-1, -1, self.config.hidden_size)
        return torch.gather(joint, dim=1, index=index)

    def forward(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                gather_index=None, txt_attn_mask=None, img_attn_mask=None,
                output_all_encoded_layers=True, txt_type_ids=None, img_type_ids=None, pairs_num=3,
                first_token_only=False, align=None, objectives=None, mask_counts=None):
        """Returns (sequence_output, losses): the list of every layer's hidden states
        [B, N, D], or with output_all_encoded_layers=False the last layer's [B, N, D]; and
        the encoder's loss terms ({} without ``align``; see :class:`UniterEncoder` for align,
        objectives and mask_counts).

        first_token_only (with output_all_encoded_layers=False): the output is the [CLS]
        position alone, [B, 1, D], which is all the pooler reads; it saves most of the last
        layer."""
        if first_token_only and output_all_encoded_layers:
            raise ValueError("first_token_only needs output_all_encoded_layers=False")
        if align and (txt_attn_mask is None or img_attn_mask is None):
            raise ValueError("alignment objectives (IAIS) need txt_attn_masks and img_attn_masks in the batch "
                             "(build the dataset with IAIS enabled)")
        embedding_output = self.embed(input_ids, position_ids, img_feat, img_pos_feat, gather_index,
                                      txt_type_ids, img_type_ids)
        layers, losses = self.encoder(
            embedding_output, attention_mask, txt_attn_mask, img_attn_mask, input_ids.size(1),
            output_all_encoded_layers=output_all_encoded_layers, pairs_num=pairs_num,
            first_token_only=first_token_only, align=align, objectives=objectives, mask_counts=mask_counts)
        return (layers if output_all_encoded_layers else layers[-1]), losses
