"""
The CLIP model, its fine-tuning switches and its checkpoints: what nanoGPT's model.py is.

- CLIP: a ViT image tower and a causal text Transformer with the constructor signature, forward
  and state-dict keys of `open_clip.CLIP`, so a minclip checkpoint loads into open_clip with
  strict=True and gives the same embeddings (tested), and open_clip weights load into it;
  model_config builds the named MODEL_SIZES (tiny is the CPU default).
- Captioner: CLIPS's prefix-LM caption head (trained by clip_scratch.py, run by eval.py --caption).
- Fine-tuning: set_trainable (which parameters train), param_groups (AdamW's groups, the text
  tower's lr multiplier).
- Checkpoints: save_checkpoint (atomic, CPU tensors), load_checkpoint (one line on what is wrong
  with a file), load_model (a ckpt.pt, local-dir:DIR or open_clip's NAME:PRETRAINED), load_clip (any
  of them as this file's CLIP), init_geometry and init_preprocess (read before any weights),
  export_open_clip.

The training loop's utilities (DDP, schedule, all-gather, FLOPs, the run's log) are training.py's.
Method scripts import this module; it imports none of them (data.py's JSON reader, lazily).
"""

import codecs
import difflib
import json
import math
import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# the model: OpenAI/open_clip CLIP with open_clip's parameter names


class Attention(nn.Module):
    """Multi-head self-attention with open_clip's (nn.MultiheadAttention's) parameter layout:
    one fused in_proj for q, k, v, and out_proj. Uses F.scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False, mask=None):
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, Dh]
        # mask: bool, True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio=4.0, act=nn.GELU):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()  # named children so the keys read mlp.c_fc / mlp.c_proj
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x, causal=False, mask=None):
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, act=nn.GELU):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)]
        )
        self.grad_checkpointing = False  # keep only each block's input; recompute the rest in backward

    def forward(self, x, causal=False, mask=None):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask)
        return x


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class VisionTransformer(nn.Module):
    """Patch conv -> [class token; patches] + learned positions -> ln_pre -> blocks -> ln_post(class) @ proj."""

    def __init__(self, image_size, patch_size, width, layers, head_width, mlp_ratio, output_dim, act):
        super().__init__()
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, return_tokens=False):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        # layernorm is per token: ln_post(x)[:, 0] == ln_post(x[:, 0])
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        pooled = x[:, 0] @ self.proj
        return (pooled, x[:, 1:]) if return_tokens else pooled


VISION_KEYS, TEXT_KEYS = (
    {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"},
    {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
)
# what minclip does anyway
VISION_KEYS_DEFAULT, TEXT_KEYS_DEFAULT = {"pool_type": "tok"}, {"pool_type": "argmax"}


class CLIP(nn.Module):
    """CLIP with the constructor signature and state-dict keys of `open_clip.CLIP`, so
    `open_clip.CLIP(**model_cfg).load_state_dict(CLIP(**model_cfg).state_dict())` is exact.
    Only the standard ViT + causal text Transformer configuration is supported."""

    def __init__(
        self,
        embed_dim,
        vision_cfg,
        text_cfg,
        quick_gelu=False,
        init_logit_scale=math.log(1 / 0.07),
        **unsupported,
    ):
        super().__init__()
        v, t = dict(vision_cfg), dict(text_cfg)
        # any other open_clip option that is set (layer scale, attentional pooling, an HF text tower,
        # another pooling...) would be silently ignored here: refuse it instead
        unsupported |= {
            f"vision_cfg.{k}": x
            for k, x in v.items()
            if k not in VISION_KEYS and x not in (None, False, 0, VISION_KEYS_DEFAULT.get(k))
        }
        unsupported |= {
            f"text_cfg.{k}": x
            for k, x in t.items()
            if k not in TEXT_KEYS and x not in (None, False, 0, TEXT_KEYS_DEFAULT.get(k))
        }
        if any(x not in (None, False, 0) for x in unsupported.values()):
            raise ValueError(f"unsupported open_clip options: {unsupported}")
        act = QuickGELU if quick_gelu else nn.GELU
        self.visual = VisionTransformer(
            v.get("image_size", 224),
            v.get("patch_size", 16),
            v.get("width", 768),
            v.get("layers", 12),
            v.get("head_width", 64),
            v.get("mlp_ratio", 4.0),
            embed_dim,
            act,
        )
        width, layers = t.get("width", 512), t.get("layers", 12)
        self.context_length, self.vocab_size = t.get("context_length", 77), t.get("vocab_size", 49408)
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.transformer = Transformer(width, layers, t.get("heads", 8), t.get("mlp_ratio", 4.0), act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # open_clip's text-tower init (OpenAI's)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def encode_image(self, image, normalize=False, return_tokens=False):
        x, tokens = self.visual(image, return_tokens=True)
        x = F.normalize(x, dim=-1) if normalize else x
        return (x, tokens) if return_tokens else x

    def encode_text(self, text, normalize=False, return_tokens=False):
        eot = text.argmax(dim=-1)  # the EOT token has the highest id (open_clip's 'argmax' pooling)
        # causal mask: positions after the last EOT cannot change the result. The scripts' collate cuts
        # the batch there (data.trim_tokens), so on a GPU and under torch.compile the tokens' length is
        # used as given (finding it is a host sync and a graph break); elsewhere any tokens are cut here
        L = (
            text.shape[1]
            if text.device.type != "cpu" or torch.compiler.is_compiling()
            else int(eot.max()) + 1
        )
        x = self.token_embedding(text[:, :L]) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L, width]
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return (pooled, x) if return_tokens else pooled

    def set_grad_checkpointing(self, enable=True):
        """open_clip's switch: both towers recompute their blocks' activations in the backward pass
        (about one extra forward of compute for activation memory of one tensor per block)."""
        self.visual.transformer.grad_checkpointing = self.transformer.grad_checkpointing = enable

    def forward(self, image=None, text=None):
        """-> (image features [B, D], text features [T, D], logit scale): open_clip.CLIP.forward's output."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def prefix_lm_mask(prefix_valid, n_query):
    """The captioner's attention mask, bool [B, 1, P+Q, P+Q], True = may attend. Prefix tokens
    attend to every valid prefix token (bidirectionally) and never to a query; query q attends to
    every valid prefix token and to queries <= q. prefix_valid: bool [B, P], False = padding."""
    B, P = prefix_valid.shape
    T = P + n_query
    allowed = torch.ones(T, T, dtype=torch.bool, device=prefix_valid.device).tril()
    # everyone sees the whole prefix; the triangle keeps queries causal and out of the prefix's view
    allowed[:, :P] = True
    keys = torch.cat([prefix_valid, prefix_valid.new_ones(B, n_query)], dim=1)  # [B, T]
    return (allowed[None] & keys[:, None, :])[:, None]


class Captioner(nn.Module):
    """CLIPS's captioner, a prefix-LM Transformer. Prefix = the image's patch tokens and the web
    caption's text-encoder token outputs, each linearly projected; then n_query learnable query
    tokens (prefix_lm_mask); query q's output -> LayerNorm -> logits for token q+1 of the full
    synthetic caption. `vocab`: the token ids the output layer covers (None = all vocab_size).
    A module of its own beside the CLIP (open_clip has no place for it): it reads the CLIP's patch
    tokens and text-token outputs (encode_image / encode_text with return_tokens=True)."""

    def __init__(self, vision_width, text_width, width, layers, heads, n_query, vocab_size=49408, vocab=None):
        super().__init__()
        self.image_proj = nn.Linear(vision_width, width)
        self.text_proj = nn.Linear(text_width, width)
        self.queries = nn.Parameter(0.02 * torch.randn(n_query, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.register_buffer("vocab", torch.tensor(vocab) if vocab is not None else torch.arange(vocab_size))
        self.head = nn.Linear(width, len(self.vocab), bias=False)

    def forward(self, image_tokens, text_tokens, text):
        """image_tokens [B, N, vision_width], text_tokens [B, L, text_width] (the web caption's
        outputs), text long [B, >= L] (its token ids: the prefix ends at each caption's EOT)
        -> logits [B, n_query, len(vocab)]"""
        B, Q, L = image_tokens.shape[0], self.queries.shape[0], text_tokens.shape[1]
        # [B, L]: up to its EOT
        text_valid = torch.arange(L, device=text.device) <= text.argmax(-1, keepdim=True)
        # [B, P, width]
        prefix = torch.cat([self.image_proj(image_tokens), self.text_proj(text_tokens)], dim=1)
        x = torch.cat([prefix, self.queries.to(prefix.dtype).expand(B, -1, -1)], dim=1)  # [B, P+Q, width]
        valid = torch.cat([text_valid.new_ones(B, image_tokens.shape[1]), text_valid], dim=1)
        x = self.transformer(x, mask=prefix_lm_mask(valid, Q))
        return self.head(self.ln_final(x[:, -Q:]))

    @torch.no_grad()
    def greedy(self, logits):
        """logits [B, Q, V'] -> token ids [B, Q]. The queries do not read earlier predictions, so
        greedy decoding is one pass: the argmax at every position (cut at the first EOT to decode)."""
        return self.vocab[logits.argmax(-1)]


# vision width, vision layers, text width, text layers, embed dim, patch size
MODEL_SIZES = {
    "tiny": (128, 4, 128, 2, 128, 16),
    "small": (384, 6, 256, 4, 256, 16),
    "base": (768, 12, 512, 12, 512, 16),
    "base32": (768, 12, 512, 12, 512, 32),  # open_clip's ViT-B-32 (bench/gpu.py's model)
}


def model_config(size, image_size, context_length=77, vocab_size=49408):
    """open_clip-style model_cfg for a named size. 'tiny' is the CPU default for the shapes world."""
    w, l, tw, tl, embed, patch = MODEL_SIZES[size]
    return dict(
        embed_dim=embed,
        vision_cfg=dict(
            image_size=image_size, patch_size=patch, width=w, layers=l, head_width=64 if w >= 256 else 32
        ),
        text_cfg=dict(
            context_length=context_length, vocab_size=vocab_size, width=tw, heads=max(tw // 64, 4), layers=tl
        ),
    )


# -----------------------------------------------------------------------------
# fine-tuning: which parameters train, their AdamW groups; checkpoints written atomically


def param_groups(model, weight_decay, text_lr_mult=1.0):
    """AdamW groups of a module's trainable parameters: no weight decay on tensors with ndim < 2
    (biases, norms, class token, logit_scale). For a CLIP, the text tower (all but `visual.*` and
    logit_scale) gets lr x text_lr_mult, kept as the group's 'lr_mult' (the loop sets lr x lr_mult);
    any other module (the CLIPS captioner) keeps the default 1. Frozen parameters are left out."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        text = not name.startswith("visual.") and name != "logit_scale"
        key = (p.ndim >= 2, text)
        g = groups.setdefault(
            key,
            {
                "params": [],
                "weight_decay": weight_decay if key[0] else 0.0,
                "lr_mult": text_lr_mult if text else 1.0,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def l2sp(pairs):
    """L2-SP (Li et al. 2018; the HNC thesis's anchor): the sum of ||theta - theta_0||^2 over (theta,
    theta_0) pairs of tensors, in fp32. clip_hardneg anchors to the init's weights, clip_dpo to the
    reference's."""
    return sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in pairs)


FINETUNE_MODES = ("full", "text", "vision", "last")


def set_trainable(model, mode):
    """Freeze a CLIP for fine-tuning -> the names of the parameters left trainable.
      full    everything
      text    the text tower: token and position embeddings, transformer, ln_final, text_projection
      vision  the image tower: visual.* (its projection included)
      last    the last residual block of each tower only
    logit_scale stays trainable in every mode (a script that wants it fixed freezes it itself).
    Frozen parameters get requires_grad=False, so param_groups leaves them out of the optimizer."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tune mode {mode!r}, choose from {', '.join(FINETUNE_MODES)}")
    last_v, last_t = len(model.visual.transformer.resblocks) - 1, len(model.transformer.resblocks) - 1
    rule = {
        "full": lambda n: True,
        "text": lambda n: not n.startswith("visual."),
        "vision": lambda n: n.startswith("visual."),
        "last": lambda n: n.startswith(
            (f"visual.transformer.resblocks.{last_v}.", f"transformer.resblocks.{last_t}.")
        ),
    }[mode]
    for name, p in model.named_parameters():
        p.requires_grad_(name == "logit_scale" or rule(name))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def to_cpu(obj):
    """every tensor in obj (dicts, lists, tuples) detached and on the CPU"""
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj


def save_checkpoint(path, obj):
    """atomic: a crash mid-write leaves the previous checkpoint intact. Tensors are saved on the CPU,
    so torch.load needs no map_location on a machine without the GPU (the optimizer's load_state_dict
    moves its state back to the parameters' device on resume)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(to_cpu(obj), tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# loading: minclip checkpoints, open_clip models (hub names, local-dir: folders), export


CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_checkpoint(spec):
    """a file path (an existing file, or a name like ckpt.pt), not local-dir:DIR or NAME:PRETRAINED"""
    return os.path.isfile(spec) or (":" not in spec and spec.endswith(CKPT_SUFFIXES))


def _refuse(path, why):
    raise SystemExit(f"error: {path}: {why}")


def load_checkpoint(path, clip=None, captioner=None, need=()):
    """A minclip training checkpoint -> its dict: "model" (the open_clip towers' state dict),
    "model_cfg" (open_clip's config for them), "captioner" + "captioner_cfg" (CLIPS, else None),
    "optimizer", "step", "args", "rng", loaded on the CPU with weights_only=True. Its weights are
    checked against `clip` and `captioner` if given (a resumed run: the models its flags build),
    else against the models its own configs build (on the meta device, no memory). need: keys the
    caller needs too (resume: optimizer, step, rng). Anything else exits with one line naming the
    file and what is wrong with it: missing, empty, cut short, text, unreadable by torch, a
    .safetensors file, a bare state dict, no model_cfg, weights that do not fit, a missing key."""
    if not os.path.isfile(path):
        _refuse(path, "a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if path.endswith(".safetensors") or (head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < size):
        _refuse(
            path,
            "a .safetensors file holds weights without the config that builds them: give its folder "
            f"as local-dir:{os.path.dirname(path) or '.'} (an open_clip hub folder, open_clip_config.json beside it)",
        )
    if size == 0:
        _refuse(path, "empty (0 bytes): copied before the checkpoint was written?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ... by the damage
    except Exception as e:
        _refuse(path, _unreadable(path, e))
    if not isinstance(ckpt, dict):
        _refuse(path, f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    tensors = lambda d: isinstance(d, dict) and all(isinstance(v, torch.Tensor) for v in d.values())
    if "model_cfg" not in ckpt:  # not written by minclip: say what it is and how to load it
        if ckpt and tensors(ckpt) or "state_dict" in ckpt:  # open_clip loads both kinds as NAME:FILE
            what = (
                "an open_clip training checkpoint"
                if "state_dict" in ckpt
                else f"a bare state dict ({len(ckpt)} tensors)"
            )
            _refuse(
                path,
                f"{what} without the model_cfg that says which model it is: give it as NAME:{path} with its "
                "open_clip architecture NAME (e.g. ViT-B-32; OpenAI's and other QuickGELU weights as ViT-B-32-quickgelu), or "
                "re-save it with the model_cfg of its --model_size",
            )
        if "model" in ckpt:
            _refuse(
                path,
                "'model' without 'model_cfg' (the open_clip config that builds it): re-save it with the "
                "model_cfg of its --model_size",
            )
        _refuse(
            path,
            f"not a minclip checkpoint: no 'model' and 'model_cfg' (keys: {', '.join(map(str, list(ckpt)[:6]))})",
        )
    for key in ("model", *need):
        if key not in ckpt:
            _refuse(path, f"no '{key}' in the checkpoint (keys: {', '.join(map(str, ckpt))})")
    if not tensors(ckpt["model"]) or not tensors(ckpt.get("captioner") or {}):
        _refuse(path, "its 'model' or 'captioner' is not a state dict of tensors")
    # the towers and the captioner as one key space, so a captioner too many or too few is named like any key
    state = ckpt["model"] | {f"captioner.{k}": v for k, v in (ckpt.get("captioner") or {}).items()}
    against = "the model this run builds from its flags" if clip is not None else "its model_cfg"
    if clip is None:
        with torch.device("meta"):  # shapes only: a base model costs nothing to build here
            clip = _build(path, CLIP, ckpt["model_cfg"], "model_cfg")
            if ckpt.get("captioner_cfg"):
                captioner = _build(path, Captioner, ckpt["captioner_cfg"], "captioner_cfg")
    own = clip.state_dict() | {
        f"captioner.{k}": v for k, v in (captioner.state_dict() if captioner is not None else {}).items()
    }
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} of another shape (e.g. {k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model)"
        )
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if problems:
        _refuse(path, f"its weights do not fit {against}: " + "; ".join(problems))
    return ckpt


def _build(path, cls, cfg, name):
    """cls(**cfg) (CLIP or Captioner) with fresh weights, or one line: the file's config is not one minclip builds"""
    try:
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        _refuse(path, f"its {name} does not describe a model minclip builds ({type(e).__name__}: {e})")


def _unreadable(path, error):
    """why torch.load failed on path, from the file itself: torch's own errors name no cause"""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):  # torch's zip format, its end missing
        return f"cut short ({size:,} bytes, the end of its zip archive is missing): copied while it was being written?"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at byte 64 is fine
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"a text file, not a torch checkpoint (it begins {text.strip()[:40]!r})"
    except UnicodeDecodeError:
        pass
    if "Weights only load failed" in str(error):
        return (
            "it holds Python objects besides tensors, numbers and containers, which are not loaded "
            "(weights_only=True): not a minclip checkpoint"
        )
    message = str(error).strip().splitlines()[0][:120] if str(error).strip() else "no message"
    return f"not a checkpoint torch can read ({type(error).__name__}: {message})"


def load_model(spec, device="cpu", flag="--model"):
    """spec: a minclip checkpoint (*.pt), 'local-dir:DIR' (open_clip hub directory) or
    'NAME:PRETRAINED' (open_clip, e.g. ViT-B-32:openai; PRETRAINED may be a file) -> (model,
    preprocess, tokenizer), eval mode. model.image_size is the native resolution; minclip models
    also carry model.model_cfg. A NAME without PRETRAINED (random weights) is refused, and weights
    that are neither cached nor downloadable fail at once; every error is one line naming `flag`."""
    import open_clip

    if is_checkpoint(spec):
        ckpt = load_checkpoint(spec)
        model = _build(spec, CLIP, ckpt["model_cfg"], "model_cfg")
        model.load_state_dict(ckpt["model"], strict=True)
        model.model_cfg, model.image_size = (
            ckpt["model_cfg"],
            int(ckpt["model_cfg"]["vision_cfg"].get("image_size", 224)),
        )
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        # a fine-tune's --init's; else open_clip's default (OpenAI's)
        model.preprocess_cfg = _preprocess(ckpt.get("preprocess_cfg"))
        preprocess = open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(size=model.image_size, **model.preprocess_cfg), is_train=False
        )
        return model.to(device).eval(), preprocess, tokenizer
    kwargs = {}
    if spec.startswith("local-dir:"):
        d, name = spec[len("local-dir:") :], spec
        # open_clip itself only logs a warning and returns a *randomly initialised* model when the
        # directory has a config but no weights file, so check for both here
        if not os.path.isfile(os.path.join(d, "open_clip_config.json")):
            raise SystemExit(f"error: {flag} {spec}: no open_clip_config.json in {d}")
        if not any(f.endswith((".safetensors", ".bin", ".pth")) for f in os.listdir(d)):
            raise SystemExit(f"error: {flag} {spec}: no weights (*.safetensors, *.bin, *.pth) in {d}")
        from data import DataError, read_json  # model.py imports no other minclip module at the top

        try:
            config = read_json(os.path.join(d, "open_clip_config.json"))
        except DataError as err:
            raise SystemExit(f"error: {flag} {spec}: {err}") from None
        if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
            raise SystemExit(f'error: {flag} {spec}: {d}/open_clip_config.json has no "model_cfg" object')
        model_cfg = config["model_cfg"]
    else:
        name, _, pretrained = spec.partition(":") if not spec.startswith("hf-hub:") else (spec, "", "")
        arch, known = name.replace("/", "-"), open_clip.list_models()
        # open_clip's own error for an unknown name lists every config it has (~3,000 characters)
        if not name.startswith("hf-hub:") and arch not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise SystemExit(
                f"error: {flag} {spec}: neither a checkpoint file, a local-dir: folder nor a known open_clip "
                "NAME:PRETRAINED"
                + (f" (close names: {', '.join(close)})" if close else "")
                + (f"; an open_clip hub folder is given as local-dir:{spec}" if os.path.isdir(spec) else "")
            )
        # pitfall: OpenAI's ViT-B-32 (and any *-quickgelu tag) was trained with QuickGELU. open_clip
        # 3.x builds plain `ViT-B-32` with GELU and only *warns* about the mismatch, and a fine-tuned
        # checkpoint passed as a file path gets no warning at all: every score silently changes.
        # so follow the tag's flag here; for a file path, name the model ViT-B-32-quickgelu yourself.
        tag = open_clip.pretrained.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        if pretrained and not tag and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            close = difflib.get_close_matches(pretrained.lower().replace("-", "_"), tags, n=3)
            raise SystemExit(
                f"error: {flag} {spec}: '{pretrained}' is neither a pretrained tag of {name} nor a file"
                + (
                    f" (close tags: {', '.join(close)})"
                    if close
                    else f" ({len(tags)} tags: open_clip.list_pretrained())"
                )
            )
        if not pretrained and not name.startswith("hf-hub:"):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise SystemExit(
                f"error: {flag} {spec}: no PRETRAINED tag, so its weights would be random: give NAME:PRETRAINED"
                + (
                    f", one of {', '.join(f'{name}:{t}' for t in tags[:4])}"
                    + (f" ({len(tags)} tags)" if len(tags) > 4 else "")
                    if tags
                    else " (open_clip has no pretrained tag for it: a weights file as NAME:PATH)"
                )
            )
        if pretrained and not os.path.isfile(pretrained):
            _check_download(open_clip, arch, pretrained, spec, flag)
        kwargs["pretrained"] = pretrained or None
        kwargs["force_quick_gelu"] = bool(tag.get("quick_gelu", False))
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is not None and kwargs["force_quick_gelu"]:
            model_cfg = {**model_cfg, "quick_gelu": True}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    # open_clip's: no download, a bad config, a PRETRAINED file that is damaged or does not fit
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why if len(why) <= 200 else why[:200].rsplit(" ", 1)[0] + " ..."  # at a word boundary
        weights = kwargs.get("pretrained") or ""
        if os.path.isfile(weights):
            try:
                torch.load(weights, map_location="cpu", weights_only=True)
                why = f"the weights in {weights} do not fit open_clip's {name} ({why})"
            except Exception as load_error:
                why = f"{weights}: {_unreadable(weights, load_error)}"
        raise SystemExit(f"error: {flag} {spec}: {why}") from None
    size = model.visual.image_size
    model.image_size, model.model_cfg = int(size[0] if isinstance(size, (tuple, list)) else size), model_cfg
    model.preprocess_cfg = _preprocess(model.visual.preprocess_cfg)  # what preprocess applies
    return model.to(device).eval(), preprocess, tokenizer


def _check_download(open_clip, arch, tag, spec, flag, timeout=3.0):
    """one line at once when arch:tag's weights are neither cached nor reachable (open_clip: ~1 min of retries)"""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    repo = (cfg.get("hf_hub") or "").rstrip("/")
    if not repo:
        return  # a plain url: let open_clip try it
    names = [
        n for n in (cfg.get("hf_filename"), "open_clip_model.safetensors", "open_clip_pytorch_model.bin") if n
    ]
    if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        raise SystemExit(
            f"error: {flag} {spec}: its weights are not in the local cache ({constants.HF_HUB_CACHE}) and {host} "
            f"cannot be reached (offline?): fetch them once where there is a network, or give a weights file as "
            f"{file_arch(open_clip, arch, tag)}:PATH"
        ) from None


def file_arch(open_clip, arch, tag):
    """the architecture NAME under which a weights FILE of arch:tag loads right as NAME:FILE: a tag
    trained with QuickGELU (OpenAI's, and every *-quickgelu tag) needs the NAME-quickgelu config, since
    a file path gets no tag and plain NAME builds GELU: every score would silently change"""
    quick = open_clip.pretrained.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    return (
        f"{arch}-quickgelu"
        if quick and not arch.endswith("-quickgelu") and f"{arch}-quickgelu" in open_clip.list_models()
        else arch
    )


def init_geometry(spec):
    """(image size, context length) of the model a spec names, from its config alone, so a script can
    check its data before loading weights; None where it cannot be read (load_model then says why)."""
    try:
        if is_checkpoint(spec):
            cfg = torch.load(spec, map_location="cpu", weights_only=True, mmap=True)["model_cfg"]
        elif spec.startswith("local-dir:"):
            with open(os.path.join(spec[len("local-dir:") :], "open_clip_config.json")) as f:
                cfg = json.load(f)["model_cfg"]
        elif spec.startswith("hf-hub:"):
            from open_clip.factory import _get_hf_config  # a small download: the weights come later

            cfg = _get_hf_config(spec[len("hf-hub:") :])["model_cfg"]
        else:
            import open_clip

            cfg = open_clip.get_model_config(spec.partition(":")[0])
        size = cfg["vision_cfg"]["image_size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size), int(
            cfg["text_cfg"].get("context_length", 77)
        )
    except Exception:  # a missing or damaged file, an unknown name: load_model's one line says which
        return None


def init_preprocess(spec):
    """The evaluation preprocessing of the model a spec names, from its config alone (no weights, no
    download but an hf-hub: config), as open_clip builds it: {mean, std, interpolation, resize_mode,
    fill_color} (data.PREPROCESS's keys), its pretrained tag's (open_clip.pretrained.get_pretrained_cfg)
    or its hub folder's or checkpoint's, over open_clip's default (OpenAI's mean and std, the shorter
    side bicubic, a centre crop), which clip_scratch.py's checkpoints and NAME:FILE weights keep. The
    fine-tuning scripts train on
    these pixels (data.load_image, data.to_tensor), so training sees what evaluation does: e.g.
    ViT-L-14:laion2b_s32b_b82k's mean and std are 0.5, the ViT-H-14 dfn5b tags squash the image."""
    cfg = {}
    try:
        if is_checkpoint(spec):  # a fine-tune keeps its --init's (clip_hardneg.py, clip_dpo.py)
            cfg = (
                torch.load(spec, map_location="cpu", weights_only=True, mmap=True).get("preprocess_cfg") or {}
            )
        elif spec.startswith("local-dir:"):
            with open(os.path.join(spec[len("local-dir:") :], "open_clip_config.json")) as f:
                cfg = json.load(f).get("preprocess_cfg") or {}
        elif spec.startswith("hf-hub:"):
            from open_clip.factory import _get_hf_config

            cfg = _get_hf_config(spec[len("hf-hub:") :]).get("preprocess_cfg") or {}
        else:
            import open_clip

            name, _, tag = spec.partition(":")
            cfg = open_clip.pretrained.get_pretrained_cfg(name.replace("/", "-"), tag) if tag else {}
    except Exception:  # a missing or damaged file, an unknown name: load_model's one line says which
        cfg = {}
    return _preprocess(cfg)


def _preprocess(cfg):
    """an open_clip preprocess config (a dict, its keys a subset of PreprocessCfg's) over open_clip's
    defaults -> data.PREPROCESS's keys, lists as tuples"""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from data import PREPROCESS

    merged = merge_preprocess_dict(PreprocessCfg(), cfg if isinstance(cfg, dict) else {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items() if k in PREPROCESS}


def load_clip(spec, device="cpu", flag="--init"):
    """The --init of the fine-tuning scripts: any spec load_model accepts -> (minclip CLIP with its
    weights, model_cfg, preprocess, tokenizer); model.preprocess_cfg is the one preprocess applies
    (init_preprocess's keys). open_clip's weights load into minclip's CLIP with strict=True (same
    names, same maths), so every script trains one model class; a model that is not the standard ViT
    + text Transformer CLIP is one clear error. Loaded and converted on the CPU (minclip's CLIP built
    on the meta device, then given open_clip's tensors), then moved: one copy on the device."""
    model, preprocess, tokenizer = load_model(spec, "cpu", flag)
    if not isinstance(model, CLIP):
        try:
            with torch.device("meta"):  # no random init of a copy: assign=True takes open_clip's tensors
                ours = CLIP(**model.model_cfg)
            ours.load_state_dict(model.state_dict(), strict=True, assign=True)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(
                f"error: {flag} {spec}: minclip's CLIP cannot hold this model ({str(e).splitlines()[0]})"
            ) from None
        ours.model_cfg, ours.image_size, ours.preprocess_cfg = (
            model.model_cfg,
            model.image_size,
            model.preprocess_cfg,
        )
        model = ours
    return model.to(device).eval(), model.model_cfg, preprocess, tokenizer


def export_open_clip(model, model_cfg, out_dir):
    """Write an open_clip hub directory: open_clip_config.json + open_clip_model.safetensors, which
    `open_clip.create_model_and_transforms("local-dir:" + out_dir)` loads with strict=True."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    # a fine-tune's --init's, else OpenAI's
    preprocess = getattr(model, "preprocess_cfg", None) or _preprocess({})
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": model_cfg["vision_cfg"]["image_size"],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()},
        },
    }
    # safetensors wants contiguous tensors
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # weights first: a crash between the two writes must not leave a config without weights, which
    # open_clip would load as a random model (see load_model)
    weights, cfg_path = (
        os.path.join(out_dir, "open_clip_model.safetensors"),
        os.path.join(out_dir, "open_clip_config.json"),
    )
    save_file(state, f"{weights}.tmp")
    os.replace(f"{weights}.tmp", weights)
    with open(f"{cfg_path}.tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(f"{cfg_path}.tmp", cfg_path)
