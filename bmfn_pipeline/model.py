"""BMFN (Liu et al., ICASSP 2022): bi-directional modality fusion of VGG-19 pool5 maps and VGGish vectors.

The data flow is the live path of the official code (bmfn-reference.md section 2), batch-first and float32.
Two project decisions (reference section 13) differ from that code: the expansion self-attention (ESA) is a
learned, registered module as in the paper's eq. (4), so eval mode is deterministic and batch independent; and
no dead parameters are registered. Section numbers below (§) refer to bmfn-reference.md, eq. to bmfn-paper.txt.

The parallel blocks of each stage (three temporal encoders, four cross-modal attentions, two fusions) are held as
one module per stage whose weights have a leading group dim: it computes what separate modules compute, with about
half the kernels per training step, whose number sets a step's time at AVE's sizes. `BMFN.load_state_dict` reads the
one-module-per-block checkpoints of earlier bmfn versions too (`group_state_dict`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmfn_pipeline.ave import BACKGROUND, SEGMENTS
from bmfn_pipeline.errors import BmfnError

# Architecture constants (§2, §7 last paragraph).
D_MODEL = 256  # width of every temporal block (§2.3, eq. 4-5: d = 256)
HEADS = 4  # heads of every attention (§2.3, §2.5, §2.6)
FFN_DIM = 2048  # feed-forward width of the encoder and cross-modal layers (§2.3, §2.5)
DROPOUT = 0.1  # attention-weight, residual, FFN, MFB and FBFM dropout (§2.2-2.6)
VISUAL_DROPOUT = 0.2  # dropout after v_fc (§2 step 1)
MFB_K = 5  # MFB sum-pooling window, the paper's p (§2.2, eq. 2)
MFB_O = 512  # MFB output channels (§2.2)
ESA_EXPANSION = 2  # heads are expanded 4 -> 8 -> 4, the paper's r (§2.4, eq. 4)
ESA_ACTIVATION = "sigmoid"  # the paper's delta in eq. 4; the official code uses ReLU6 (§13 decision a)
ESA_LAYERS = 2  # EncoderLayer1 (ESA) layers per temporal encoder (§2.3)
NSA_LAYERS = 2  # EncoderLayer (NSA) layers after them (§2.3)
VISUAL_DIM = 512  # VGG-19 pool5 channels (§2)
AUDIO_DIM = 128  # VGGish embedding size (§2)
CELLS = 49  # 7x7 pool5 grid cells (§2)
HIDDEN = 256  # bottleneck width inside the visual and fusion attentions (§2.1, §2.2; eq. 1, 3: d = 256)
# bmfn-reference.md 6: a segment is an event when sigmoid(event logit) exceeds this (the paper writes >=).
EVENT_THRESHOLD = 0.5

Mode = Literal["fully", "weakly"]
_ESA_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu6": nn.ReLU6}


@dataclass(frozen=True)
class BMFNConfig:
    """Hyper-parameters of one BMFN; the defaults are the paper's and the official code's (§2, §13)."""

    mode: Mode = "fully"
    d_model: int = D_MODEL
    heads: int = HEADS
    ffn_dim: int = FFN_DIM
    dropout: float = DROPOUT
    visual_dropout: float = VISUAL_DROPOUT
    mfb_k: int = MFB_K
    mfb_o: int = MFB_O
    mfb_dim: int = MFB_K * MFB_O  # 2560, the paper's d_m (eq. 2)
    esa_expansion: int = ESA_EXPANSION
    esa_activation: str = ESA_ACTIVATION
    esa_layers: int = ESA_LAYERS
    nsa_layers: int = NSA_LAYERS
    num_classes: int = BACKGROUND  # foreground classes; the weak head adds background (§2.7)
    visual_dim: int = VISUAL_DIM
    audio_dim: int = AUDIO_DIM
    segments: int = SEGMENTS
    cells: int = CELLS

    def __post_init__(self) -> None:
        if self.mode not in ("fully", "weakly"):
            raise BmfnError(f"BMFN config: mode must be 'fully' or 'weakly', got {self.mode!r}")
        for item in fields(self):  # sizes are whole numbers (layer counts may be 0), dropouts rates below 1
            value, default = getattr(self, item.name), item.default
            if isinstance(default, int):
                least = 0 if item.name.endswith("_layers") else 1
                whole = isinstance(value, Integral) or isinstance(value, float) and value.is_integer()
                if isinstance(value, bool) or not whole or value < least:  # 10.0 passed before these checks
                    raise BmfnError(f"BMFN config: {item.name}={value!r}, expected a whole number of at least {least}")
                object.__setattr__(self, item.name, int(value))  # numpy's too: a checkpoint holds plain numbers
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
                    raise BmfnError(f"BMFN config: {item.name}={value!r}, expected a rate from 0 to below 1")
                object.__setattr__(self, item.name, float(value))
        if self.esa_activation not in _ESA_ACTIVATIONS:
            raise BmfnError(f"BMFN config: esa_activation must be one of {sorted(_ESA_ACTIVATIONS)}, "
                            f"got {self.esa_activation!r}")
        if self.mfb_dim != self.mfb_k * self.mfb_o:
            raise BmfnError(f"BMFN config: mfb_dim {self.mfb_dim} must equal mfb_k * mfb_o = {self.mfb_k * self.mfb_o}")
        if self.d_model % self.heads:
            raise BmfnError(f"BMFN config: d_model {self.d_model} is not divisible by heads {self.heads}")


    def check_inputs(self, what: str, visual: tuple[int, ...], audio: tuple[int, ...]) -> None:
        """Refuse input shapes (visual [B,T,H,W,C], audio [B,T,D]: a batch, or [1,...] for per-clip shapes) that this
        network does not take, in one line beginning with `what`."""
        side = math.isqrt(self.cells)
        grid = f"{side},{side}" if side * side == self.cells else f"H,W (H*W = {self.cells})"
        if (len(visual) != 5 or visual[-1] != self.visual_dim or visual[2] * visual[3] != self.cells
                or tuple(audio) != (visual[0], visual[1], self.audio_dim)):
            raise BmfnError(f"{what}: expected visual [B,T,{grid},{self.visual_dim}] and audio "
                            f"[B,T,{self.audio_dim}], got {list(visual)} and {list(audio)}")


class BMFNOutput(NamedTuple):
    """event_logits [B,T] (the pre-sigmoid s of eq. 8); class_logits [B,28] fully or the raw 29-way r weakly;
    event_scores [B,29], the weak head's softmax over the MIL-pooled joint scores, None when fully supervised."""

    event_logits: Tensor
    class_logits: Tensor
    event_scores: Tensor | None


class VisualAttention(nn.Module):
    """Eq. (1): channel then spatial attention over the 7x7 cells, visual only (§2.1, the official live path)."""

    def __init__(self, visual_dim: int = VISUAL_DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.phi_c = nn.Linear(visual_dim, visual_dim)  # Phi_v^c, with ReLU (official affine_video_1)
        self.w1 = nn.Linear(visual_dim, hidden)  # W1 (affine_bottleneck)
        self.w2 = nn.Linear(hidden, visual_dim)  # W2 (affine_v_c_att)
        self.spatial_proj = nn.Linear(visual_dim, hidden)  # ReLU hidden layer before W3 (affine_video_2)
        self.w3 = nn.Linear(hidden, 1)  # W3 (affine_v_s_att)

    def forward(self, visual: Tensor) -> Tensor:
        """visual [N,cells,512] -> [N,512]."""
        squeezed = F.relu(self.w1(F.relu(self.phi_c(visual)).mean(dim=1)))
        channel = visual * (1 + torch.sigmoid(self.w2(squeezed))).unsqueeze(1)
        spatial = torch.softmax(torch.tanh(self.w3(F.relu(self.spatial_proj(channel)))).squeeze(-1), dim=-1)
        return (spatial.unsqueeze(1) @ channel).squeeze(1)


class AudioVisualFusionAttention(nn.Module):
    """AVFA, eqs. (2)-(3): MFB fusion of every cell with the segment's audio, then channel and spatial
    attention driven by the first fusion and applied to the second (§2.2)."""

    def __init__(self, config: BMFNConfig) -> None:
        super().__init__()
        c = config
        self.mfb_k, self.dropout = c.mfb_k, c.dropout
        self.phi_v1 = nn.Linear(c.visual_dim, c.mfb_dim)  # Phi_V1 (official Linear_K)
        self.phi_a1 = nn.Linear(c.audio_dim, c.mfb_dim)  # Phi_A1 (Linear_Q1)
        self.phi_v2 = nn.Linear(c.visual_dim, c.mfb_dim)  # Phi_V2 (Linear_V)
        self.phi_a2 = nn.Linear(c.audio_dim, c.mfb_dim)  # Phi_A2 (Linear_Q2)
        self.w4 = nn.Linear(c.mfb_o, HIDDEN)  # W4 (affine_bottleneck)
        self.w5 = nn.Linear(HIDDEN, c.mfb_o)  # W5 (affine_v_c_att)
        self.w6 = nn.Linear(HIDDEN, 1)  # W6 (affine_v_s_att)

    def mfb(self, visual: Tensor, audio: Tensor) -> Tensor:
        """Multi-modal factorized bilinear pooling, eq. (2): dropout on the product (as the official code,
        before the sum pooling), sum over k, signed square root, L2 normalisation over the output channels."""
        z = F.dropout(visual * audio.unsqueeze(1), self.dropout, self.training)
        z = z.unflatten(-1, (-1, self.mfb_k)).sum(dim=-1)  # element k*j + r goes to output j
        z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))  # sign(z) sqrt|z| with a finite gradient at 0
        return F.normalize(z, dim=-1)

    def forward(self, visual: Tensor, audio: Tensor) -> Tensor:
        """visual [N,cells,512], audio [N,128] -> [N,512]."""
        av1 = self.mfb(self.phi_v1(visual), self.phi_a1(audio))
        av2 = self.mfb(self.phi_v2(visual), self.phi_a2(audio))
        w = F.relu(self.w4(av1))  # W_t, per cell (unlike eq. 1, the ReLU comes before the mean)
        channel = av2 * (1 + torch.sigmoid(self.w5(w.mean(dim=1)))).unsqueeze(1)
        spatial = torch.softmax(torch.tanh(self.w6(w)).squeeze(-1), dim=-1)
        return (spatial.unsqueeze(1) @ channel).squeeze(1)


class GroupedLinear(nn.Module):
    """`groups` independent linear maps applied as one batched product: x [G,...,in] -> [G,...,out].

    Each group is initialised as nn.Linear is (§2.8); the weight is a `grouped_weight`."""

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        weight, bias = torch.empty(groups, out_features, in_features), torch.empty(groups, out_features)
        bound = in_features ** -0.5
        for group_weight, group_bias in zip(weight, bias):
            nn.init.kaiming_uniform_(group_weight, a=math.sqrt(5))
            nn.init.uniform_(group_bias, -bound, bound)
        # The weight first, as nn.Linear registers them: a last.pt's optimizer state follows the parameters' order.
        self.weight = grouped_weight(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        return _grouped_linear(x, self.weight, self.bias)


def grouped_weight(weight: Tensor) -> nn.Parameter:
    """A parameter equal to weight [G,out,in] (nn.Linear's layout per group) that is held in memory as [G,in,out],
    the layout the batched product reads. Backward then writes its gradient in the parameter's own layout; with a
    contiguous [G,out,in] parameter, autograd copied every such gradient once more to match it (one copy kernel
    per weight per training step). Checkpoints keep the [G,out,in] shape. (A flat view of it, as
    torch.nn.utils.parameters_to_vector takes, needs .contiguous() first.)"""
    return nn.Parameter(weight.transpose(1, 2).contiguous().transpose(1, 2))


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [G,...,in] @ weight[g].T + bias[g] per group g, as one batched matrix product. The bias is added after
    the product, not by it (baddbmm): a compiled step then adds it in the next fused kernel, where baddbmm first
    copied the broadcast bias into its output, a kernel per call."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.bmm(flat, weight.transpose(1, 2))
    return (out + bias.unsqueeze(1).to(out.dtype)).view(*x.shape[:-1], weight.shape[1])


class GroupedLayerNorm(nn.Module):
    """`groups` independent LayerNorms over the last dim of x [G,...,d] (weight 1, bias 0, eps 1e-5: §2.8)."""

    def __init__(self, groups: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, dim))
        self.bias = nn.Parameter(torch.zeros(groups, dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, x.shape[-1:], eps=self.eps),
                             self.weight.view(shape))


class Attention(nn.Module):
    """`groups` independent multi-head attentions with nn.MultiheadAttention's math, parameter names (per group,
    behind a leading group dim) and initialisation (§2.3, §2.8): the NSA and MHA of eqs. (5)-(7).

    With `expansion`, the ESA of eq. (4): the map Att [B,heads,T,S] is refined by a learned 1x1 expansion W7
    (heads -> expansion*heads), BN, activation, 1x1 reduction W8 and BN, and (Att + Att_hat) weights V, not
    renormalised (§2.4). The refinement holds the groups as channel groups of its convolutions and batch norms
    (88 parameters per group), so each group's statistics are its own, as with separate modules."""

    def __init__(self, groups: int, embed_dim: int, num_heads: int, dropout: float, expansion: int = 0,
                 activation: str = ESA_ACTIVATION) -> None:
        super().__init__()
        self.groups, self.num_heads, self.dropout, self.expansion = groups, num_heads, dropout, expansion
        in_proj_weight = torch.empty(groups, 3 * embed_dim, embed_dim)
        for weight in in_proj_weight:
            nn.init.xavier_uniform_(weight)
        self.in_proj_weight = grouped_weight(in_proj_weight)
        self.in_proj_bias = nn.Parameter(torch.zeros(groups, 3 * embed_dim))
        self.out_proj = GroupedLinear(groups, embed_dim, embed_dim)
        nn.init.zeros_(self.out_proj.bias)
        if expansion:
            channels, expanded = groups * num_heads, groups * num_heads * expansion
            self.w7 = nn.Conv2d(channels, expanded, kernel_size=1, groups=groups, bias=False)
            self.bn7 = nn.BatchNorm2d(expanded)
            self.activation = _ESA_ACTIVATIONS[activation]()
            self.w8 = nn.Conv2d(expanded, channels, kernel_size=1, groups=groups, bias=False)
            self.bn8 = nn.BatchNorm2d(channels)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """query [G,B,T,d] attends to memory [G,B,S,d] (the same tensor for self-attention) -> [G,B,T,d]."""
        d = query.shape[-1]
        if memory is query:
            q, k, v = _grouped_linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = _grouped_linear(query, self.in_proj_weight[:, :d], self.in_proj_bias[:, :d])
            k, v = _grouped_linear(memory, self.in_proj_weight[:, d:], self.in_proj_bias[:, d:]).chunk(2, dim=-1)
        q, k, v = (x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2).flatten(0, 1) for x in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if not self.expansion:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # as nn.MultiheadAttention runs it
        else:
            att = F.dropout(torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1), dropout,
                            self.training)
            out = (att + self._refinement(att)) @ v
        return self.out_proj(out.transpose(1, 2).flatten(2).unflatten(0, (self.groups, -1)))

    def _refinement(self, att: Tensor) -> Tensor:
        """Att_hat of eq. (4), per group: att [G*B,heads,T,S], whose heads are the convolutions' channels."""
        channels = att.unflatten(0, (self.groups, -1)).transpose(0, 1).flatten(1, 2)  # [B, G*heads, T, S]
        expanded = self.activation(self.bn7(_pointwise_conv(channels, self.w7.weight, self.groups)))
        refined = self.bn8(_pointwise_conv(expanded, self.w8.weight, self.groups))
        return refined.unflatten(1, (self.groups, -1)).transpose(0, 1).flatten(0, 1)


def _pointwise_conv(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """F.conv2d(x, weight, groups=groups) for a 1x1 kernel without bias, x [B,C_in,H,W] -> [B,C_out,H,W], written
    as a product and a sum over each group's 4 or 8 input channels. A compiled step fuses that into the kernels
    around it; cuDNN ran each of the ESA's tiny convolutions (and their gradients) as several kernels of layout
    transforms and products: about 120 of a training step's ~860 kernels, 9 % of its GPU time on an H100."""
    out_channels, in_channels = weight.shape[:2]
    x = x.unflatten(1, (groups, 1, in_channels))  # [B,G,1,C_in,H,W]
    w = weight.view(groups, out_channels // groups, in_channels, 1, 1)  # [G,C_out/G,C_in,1,1]
    return (x * w).sum(dim=3).flatten(1, 2)


class ResidualAttention(nn.Module):
    """Post-LN attention sub-layer shared by every block: LN(query + Dropout(Attention(query, memory)))."""

    def __init__(self, attention: Attention, d_model: int, dropout: float) -> None:
        super().__init__()
        self.attn = attention
        self.dropout = nn.Dropout(dropout)
        self.norm = GroupedLayerNorm(attention.groups, d_model)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        return self.norm(query + self.dropout(self.attn(query, memory)))


class FeedForward(nn.Module):
    """Post-LN feed-forward sub-layer: LN(x + Dropout(W2 Dropout(ReLU(W1 x)))), per group."""

    def __init__(self, groups: int, d_model: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = GroupedLinear(groups, d_model, ffn_dim)
        self.linear2 = GroupedLinear(groups, ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = GroupedLayerNorm(groups, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def _attention(groups: int, config: BMFNConfig, expansion: bool = False) -> ResidualAttention:
    """An attention sub-layer: ESA (eq. 4) when `expansion`, else standard multi-head attention (eqs. 5-7)."""
    c = config
    attention = Attention(groups, c.d_model, c.heads, c.dropout, c.esa_expansion if expansion else 0,
                          c.esa_activation)
    return ResidualAttention(attention, c.d_model, c.dropout)


class EncoderLayer(nn.Module):
    """One transformer encoder layer per group: ESA (eq. 4) when `expansion`, else NSA (eq. 5)."""

    def __init__(self, groups: int, config: BMFNConfig, expansion: bool) -> None:
        super().__init__()
        self.self_attn = _attention(groups, config, expansion)
        self.ffn = FeedForward(groups, config.d_model, config.ffn_dim, config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.self_attn(x, x))


class SelfAttentionBlocks(nn.Module):
    """The paper's self-attention blocks, one per input (official InternalTemporalRelationModule, §2.3): a linear
    map to d with no activation, ESA layers, then NSA layers; no final norm."""

    def __init__(self, in_dims: tuple[int, ...], config: BMFNConfig) -> None:
        super().__init__()
        groups = len(in_dims)
        self.affines = nn.ModuleList([nn.Linear(in_dim, config.d_model) for in_dim in in_dims])
        # Deep copies of one initialised layer per kind, as the official Encoder makes them (_get_clones): its ESA
        # layers start with the same weights, and so do its NSA layers.
        esa, nsa = EncoderLayer(groups, config, expansion=True), EncoderLayer(groups, config, expansion=False)
        self.layers = nn.ModuleList([copy.deepcopy(esa) for _ in range(config.esa_layers)]
                                    + [copy.deepcopy(nsa) for _ in range(config.nsa_layers)])

    def forward(self, inputs: list[Tensor]) -> Tensor:
        """inputs [B,T,in_g] per group -> [G,B,T,d]."""
        x = torch.stack([affine(block_input) for affine, block_input in zip(self.affines, inputs)])
        for layer in self.layers:
            x = layer(x)
        return x


class CrossModalAttention(nn.Module):
    """Forward (FA) and backward (BA) attention blocks, eq. (6) (official CrossModalRelationAttModule, §2.5), one
    per group: the query, mapped to d, attends to the concatenation in time of the memory and itself; then an FFN.
    There is no self-attention."""

    def __init__(self, in_dims: tuple[int, ...], config: BMFNConfig) -> None:
        super().__init__()
        groups = len(in_dims)
        self.affines = nn.ModuleList([nn.Linear(in_dim, config.d_model) for in_dim in in_dims])
        self.cross_attn = _attention(groups, config)
        self.ffn = FeedForward(groups, config.d_model, config.ffn_dim, config.dropout)

    def forward(self, queries: list[Tensor], memory: Tensor) -> Tensor:
        """queries [B,T,in_g] per group, memory [G,B,T,d] -> [G,B,T,d]."""
        q = torch.stack([affine(query) for affine, query in zip(self.affines, queries)])
        return self.ffn(self.cross_attn(q, torch.cat([memory, q], dim=2)))


class ForwardBackwardFusion(nn.Module):
    """FBFM, eq. (7) (§2.6), per group: query fa * ba attends to cat_time(fa, ba); residual and LN, no FFN."""

    def __init__(self, groups: int, config: BMFNConfig) -> None:
        super().__init__()
        self.fusion_attn = _attention(groups, config)

    def forward(self, forward_feat: Tensor, backward_feat: Tensor) -> Tensor:
        """[G,B,T,d] x2 -> [G,B,T,d]."""
        return self.fusion_attn(forward_feat * backward_feat, torch.cat([forward_feat, backward_feat], dim=2))


class LocalizationHead(nn.Module):
    """Eq. (8) (§2.7): event-relevance logits per segment and class logits from the max over time of F.
    Weakly supervised, the class layer also has the background class and the joint scores are MIL-pooled."""

    def __init__(self, config: BMFNConfig) -> None:
        super().__init__()
        self.weakly = config.mode == "weakly"
        self.classifier = nn.Linear(config.d_model, 1)
        classes = config.num_classes + 1 if self.weakly else config.num_classes
        self.event_classifier = nn.Linear(config.d_model, classes)

    def forward(self, fused: Tensor) -> BMFNOutput:
        event_logits = self.classifier(fused).squeeze(-1)  # [B,T]; only the last axis, so B = 1 works
        class_logits = self.event_classifier(fused.amax(dim=1))
        if not self.weakly:
            return BMFNOutput(event_logits, class_logits, None)
        joint = torch.sigmoid(event_logits).unsqueeze(-1) * class_logits.unsqueeze(1)  # s_f [B,T,29]
        return BMFNOutput(event_logits, class_logits, torch.softmax(joint.amax(dim=1), dim=-1))


class BMFN(nn.Module):
    """The whole network of the paper's Fig. 3, on pre-extracted features."""

    def __init__(self, config: BMFNConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or BMFNConfig()
        self.v_fc = nn.Linear(c.visual_dim, c.visual_dim)  # per-cell input adapter, ReLU + dropout (§2 step 1)
        self.visual_dropout = nn.Dropout(c.visual_dropout)
        self.visual_attention = VisualAttention(c.visual_dim)  # -> v^E
        self.fusion_attention = AudioVisualFusionAttention(c)  # -> av
        # One module per stage of parallel blocks (module docstring); group order and official names below.
        # Self-attention blocks -> av_self, v_self, a_self (official av_encoder, video_encoder, audio_encoder).
        self.self_attention = SelfAttentionBlocks((c.mfb_o, c.visual_dim, c.audio_dim), c)
        # Eq. (6), queries v^E, a, av, av with memories av_self, av_self, v_self, a_self: FA1, FA2, BA1, BA2
        # (official video_decoder, audio_decoder, av_video_decoder, av_audio_decoder).
        self.cross_modal = CrossModalAttention((c.visual_dim, c.audio_dim, c.mfb_o, c.mfb_o), c)
        # Eq. (7): F1 from (FA1, BA1), F2 from (FA2, BA2) (official FBFM2, FBFM1).
        self.fusion = ForwardBackwardFusion(2, c)
        self.head = LocalizationHead(c)

    def forward(self, visual: Tensor, audio: Tensor) -> BMFNOutput:
        """visual [B,T,7,7,512] pool5 maps (channels last), audio [B,T,128] VGGish vectors."""
        self.config.check_inputs("BMFN input", visual.shape, audio.shape)
        c = self.config
        batch, segments = audio.shape[:2]
        cells = self.visual_dropout(F.relu(self.v_fc(visual))).flatten(0, 1).flatten(1, 2)  # [B*T,49,512]
        frames = audio.flatten(0, 1)  # [B*T,128]
        v_e = self.visual_attention(cells).unflatten(0, (batch, segments))
        av = self.fusion_attention(cells, frames).unflatten(0, (batch, segments))

        selves = self.self_attention([av, v_e, audio])  # [3,B,T,d]: av_self, v_self, a_self
        memories = torch.cat([selves[:1], selves])  # av_self, av_self, v_self, a_self
        fa_ba = self.cross_modal([v_e, audio, av, av], memories)  # [4,B,T,d]: FA1, FA2, BA1, BA2
        fused = self.fusion(fa_ba[:2], fa_ba[2:]).mean(dim=0)  # F, the mean of F1 and F2
        return self.head(fused)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also a state_dict of bmfn before grouping (one module per parallel block), through group_state_dict."""
        return super().load_state_dict(group_state_dict(state_dict), strict=strict, assign=assign)


# Blocks that bmfn held as separate modules before grouping: old name -> (grouped module, group index).
_PER_BRANCH_BLOCKS = {"av_self_attention": ("self_attention", 0), "visual_self_attention": ("self_attention", 1),
                      "audio_self_attention": ("self_attention", 2), "fa1": ("cross_modal", 0),
                      "fa2": ("cross_modal", 1), "ba1": ("cross_modal", 2), "ba2": ("cross_modal", 3),
                      "fbfm1": ("fusion", 0), "fbfm2": ("fusion", 1)}


def group_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A BMFN state_dict with one module per parallel block (bmfn before grouping) in the grouped layout; other
    state_dicts are returned as they are. Per-group tensors are stacked; the ESA refinement's convolution and
    batch-norm tensors, whose groups are channel groups, are concatenated."""
    if not any(key.split(".", 1)[0] in _PER_BRANCH_BLOCKS for key in state):
        return state
    grouped: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        block, _, rest = key.partition(".")
        if block not in _PER_BRANCH_BLOCKS:
            grouped[key] = value
            continue
        group, index = _PER_BRANCH_BLOCKS[block]
        if rest.startswith("affine."):
            grouped[f"{group}.affines.{index}.{rest.removeprefix('affine.')}"] = value
        else:
            parts.setdefault(f"{group}.{rest}", {})[index] = value
    for key, by_index in parts.items():
        tensors = [by_index[i] for i in sorted(by_index)]
        if key.endswith("num_batches_tracked"):
            grouped[key] = max(tensors)
        elif any(f".{name}." in key for name in ("w7", "bn7", "w8", "bn8")):
            grouped[key] = torch.cat(tensors)
        else:
            grouped[key] = torch.stack(tensors)
    return grouped


def predict_segments(output: BMFNOutput) -> Tensor:
    """Per-segment labels [B,T] in 0..28 (§6): the video's argmax class where sigmoid(event logit) > 0.5, else
    background (28). Weakly, the argmax is over the 29-way raw r, so a positive segment may still be 28."""
    # In float32: in bfloat16 (autocast's logits) sigmoid rounds to exactly 0.5 for logits up to 0.0078.
    positive = torch.sigmoid(output.event_logits.float()) > EVENT_THRESHOLD
    video_class = output.class_logits.argmax(dim=-1, keepdim=True)
    return torch.where(positive, video_class, torch.full_like(video_class, BACKGROUND))


def fully_supervised_loss(output: BMFNOutput, labels: Tensor) -> Tensor:
    """§5: BCE-with-logits on the event flags (mean over B*T) + cross-entropy on the video class (mean over B).
    labels [B,T,29] one-hot per segment. The video class is the max over time of each segment's argmax over the
    28 foreground columns (background segments give 0), as the official code does."""
    if output.event_scores is not None:
        raise BmfnError("fully supervised loss: the model was built with mode 'weakly'; use weakly_supervised_loss")
    foreground = labels[..., :BACKGROUND]
    event_flags = foreground.amax(dim=-1).to(output.event_logits.dtype)
    video_class = foreground.argmax(dim=-1).amax(dim=-1)
    return (F.binary_cross_entropy_with_logits(output.event_logits, event_flags)
            + F.cross_entropy(output.class_logits, video_class))


def weakly_supervised_loss(
    output: BMFNOutput, video_labels: Tensor, *, sigmoid_on_probabilities: bool = True
) -> Tensor:
    """§5: multi-label soft-margin loss of the video labels [B,29] against event_scores.

    event_scores are softmax probabilities. The official code (from AVEL and CMRAN) passes them to
    MultiLabelSoftMarginLoss, which applies a sigmoid again; that is the default here, so results are comparable.
    sigmoid_on_probabilities=False uses the same binary cross-entropy on the probabilities themselves."""
    if output.event_scores is None:
        raise BmfnError("weakly supervised loss: the model was built with mode 'fully' and has no event_scores")
    target = video_labels.to(output.event_scores.dtype)
    if sigmoid_on_probabilities:
        return F.multilabel_soft_margin_loss(output.event_scores, target)
    return F.binary_cross_entropy(output.event_scores, target)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters; 26,769,199 fully and 26,769,456 weakly for the default BMFN (§4 plus 6 x 88 ESA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
