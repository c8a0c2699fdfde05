"""Model table (docs/semantics.md §6) and the full configuration of a model instance."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import OptionError


@dataclass(frozen=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    decoder_embed_dim: int
    decoder_num_heads: int


ARCHS: dict[str, ArchSpec] = {
    "vit_small_patch16_224": ArchSpec(384, 12, 6, 4.0, 16, 192, 3),
    "vit_base_patch16_224": ArchSpec(768, 12, 12, 4.0, 16, 384, 6),
    "vit_large_patch16_224": ArchSpec(1024, 24, 16, 4.0, 16, 512, 8),
    "vit_huge_patch16_224": ArchSpec(1280, 32, 16, 4.0, 16, 512, 8),
    "vit_giant_patch14_224": ArchSpec(1408, 40, 16, 48 / 11, 14, 512, 8),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Short names accepted wherever an arch is named (create_model, the benchmarks, train --model).
ARCH_ALIASES = {"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224",
                "vit_l": "vit_large_patch16_224", "vit_h": "vit_huge_patch16_224",
                "vit_g": "vit_giant_patch14_224"}


def resolve_arch(arch: str) -> str:
    """The full arch name of ``arch`` or of its alias (case and ``-``/``_`` ignored)."""
    key = arch.strip().lower().replace("-", "_") if isinstance(arch, str) else arch
    key = ARCH_ALIASES.get(key, key)
    if key not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)} or an alias {sorted(ARCH_ALIASES)}")
    return key


def arch_spec(arch: str) -> ArchSpec:
    return ARCHS[resolve_arch(arch)]


@dataclass(frozen=True)
class VideoMAEConfig:
    """Everything that fixes a model's shapes and function (not its weights).

    ``decoder_*`` fields are ignored by the fine-tune classifier.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    tubelet_size: int = 2
    num_frames: int = 16
    img_size: int = 224
    in_chans: int = 3
    qkv_bias: bool = True
    init_values: float = 0.0  # layer-scale gammas when > 0
    drop_path_rate: float = 0.0
    learnable_pos_embed: bool = False
    attn_backend: str = "sdpa"
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    normalize_target: bool = True
    arch: str | None = field(default=None, compare=False)

    def __post_init__(self):
        _check_positive(self, ("embed_dim", "depth", "num_heads", "patch_size", "tubelet_size",
                               "num_frames", "img_size", "in_chans", "decoder_embed_dim",
                               "decoder_num_heads"))
        if self.decoder_depth < 0:
            raise OptionError(f"decoder_depth must be >= 0, got {self.decoder_depth}", option="decoder_depth")
        for what, size, unit in (("num_frames", self.num_frames, self.tubelet_size),
                                 ("img_size", self.img_size, self.patch_size)):
            if size % unit:
                raise OptionError(f"{what}={size} is not divisible by "
                                  f"{'tubelet_size' if what == 'num_frames' else 'patch_size'}={unit}", option=what)
        for what, dim, heads, option in (("embed_dim", self.embed_dim, self.num_heads, "num_heads"),
                                         ("decoder_embed_dim", self.decoder_embed_dim, self.decoder_num_heads,
                                          "decoder_num_heads")):
            if dim % heads:
                raise OptionError(f"{what}={dim} is not divisible by its number of heads {heads}", option=option)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise OptionError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}", option="drop_path_rate")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid ``(T/t, H/p, W/p)``."""
        hp = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, hp, hp)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def cube_numel(self) -> int:
        """Pixels per cube and channel count: ``in_chans * t * p * p``."""
        return self.in_chans * self.tubelet_size * self.patch_size ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # int() as the official code: 6144 for ViT-g

    @property
    def decoder_mlp_hidden(self) -> int:
        return int(self.decoder_embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


def config_for(arch: str, **overrides) -> VideoMAEConfig:
    """Config of a named arch (docs/semantics.md §6) with keyword overrides."""
    arch = resolve_arch(arch)
    a = ARCHS[arch]
    base = dict(embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
                patch_size=a.patch_size, decoder_embed_dim=a.decoder_embed_dim,
                decoder_num_heads=a.decoder_num_heads, arch=arch)
    known = set(VideoMAEConfig.__dataclass_fields__)
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown model option(s) {bad}; expected some of {sorted(known)}")
    base.update(overrides)
    return VideoMAEConfig(**base)


def _check_positive(cfg, names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{n} must be a positive int, got {v!r}")
