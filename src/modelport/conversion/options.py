"""What a conversion is asked to do: every choice ``convert`` and its command line take."""

from __future__ import annotations

from dataclasses import dataclass

from modelport import dtypes


@dataclass(frozen=True)
class Relayout:
    """One source tensor written as ``target``: its dimensions taken in the order ``axes``
    (``numpy.transpose``'s; empty keeps them), then given ``shape`` when set, which may only
    add or drop size-1 dimensions. The result is a strided view of the source's bytes."""

    source: str
    target: str
    axes: tuple[int, ...] = ()
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ConvertOptions:
    to: str | None = None
    dtype: str | None = None
    gguf_type: str | None = None  # f32 | f16 | bf16 | q8_0, for GGUF targets
    dequantize: bool = False  # GGML blocks and MLX-quantized layers become float32 (or --dtype)
    sha256: bool = False  # record the source's full sha256 in the provenance (a full read)
    extract: str | None = None
    take_all: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strip_prefix: str | None = None  # a literal prefix, or "auto"
    add_prefix: str | None = None
    renames: tuple[tuple[str, str], ...] = ()
    name_map: tuple[Relayout, ...] = ()  # applied before the renames; others left out
    materialize_ties: bool = False
    ema: bool = False
    overwrite: bool = False
    fsync: bool = False
    verify: bool = True
    dry_run: bool = False
    allow_unsafe: bool = False
    shard_size: int | str | None = None  # --to hf: bytes per shard (default 5GB)
    drop_unrepresentable: bool = False  # --all: leave out values that are not plain data

    def __post_init__(self) -> None:
        if self.dtype is not None:  # fp16, half, bf16 ...: one spelling from here on
            object.__setattr__(self, "dtype", dtypes.canonical_name(self.dtype))
