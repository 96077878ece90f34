"""Where each tensor of a model lives in a TP x PP (x virtual) layout, and with what shape.

``Layout`` says which chunk of which rank holds which layers; ``hf_shapes`` and
``mcore_chunk_shapes`` list every tensor's name (from ``hf_names``) and shape on either side;
``check_hf_state`` / ``check_shards`` hold a state against them.

Megatron layout of one chunk (local spec; the transformer-engine spec keeps the norms
inside the following linear layers, see ``hf_names``):

* ``embedding.word_embeddings.weight`` [V/tp, H]: first chunk of the first stage only.
* ``decoder.layers.{i}.self_attention.linear_qkv.weight`` [(nh + 2 ng)/tp * d, H]: rows
  grouped per query group ``[q of its nh/ng heads; k; v]``; TP splits whole groups.
* ``...linear_proj.weight`` [H, nh d/tp], ``mlp.linear_fc2.weight`` [H, F/tp]: row parallel.
* ``mlp.linear_fc1.weight`` [2 F/tp, H]: ``[gate shard; up shard]`` of this rank.
* Family options: ``linear_qkv.bias`` [(nh + 2 ng)/tp * d] grouped as the weight's rows;
  ``q_layernorm.weight`` / ``k_layernorm.weight`` [d], replicated.
* ``decoder.final_layernorm.weight`` and ``output_layer.weight`` [V/tp, H] (LM head) or
  ``output_layer.linear.weight`` (scalar head; a critic's also ``.bias``, optional here) on
  the last chunk of the last stage.
  Tied embeddings: no output layer weight when one chunk is both first and last, else a
  copy of the word embeddings on the last stage.

Layer ``i`` of chunk ``c`` on stage ``p`` is global layer ``c * L/vpp + p * L/(pp vpp) + i``,
as megatron-core's ``get_transformer_layer_offset`` (uniform split, no embedding/loss
accounting; uneven first/last stages are not supported, ``build.py`` does not use them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hpc_rlhf.config import ModelConfig, ParallelConfig
from hpc_rlhf.models.hf_names import (
    EXTRA_STATE,
    HEAD_LM,
    HEAD_SCORE,
    HF_EMBEDDING,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    HF_SCORE,
    MCORE_EMBEDDING,
    MCORE_FINAL_NORM,
    MCORE_OUTPUT,
    MCORE_SCORE,
    MCORE_SCORE_BIAS,
    ConversionError,
    hf_layer_names,
    mcore_layer_names,
)


@dataclass(frozen=True)
class Layout:
    """A TP x PP (x virtual stages) layout of ``model`` and where its layers live."""

    model: ModelConfig
    tp: int
    pp: int
    vpp: int | None = None

    def __post_init__(self):
        self.model.validate()
        ParallelConfig(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
        ).validate(self.model)

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank: the virtual stages, or 1."""
        return self.vpp or 1

    @property
    def layers_per_chunk(self) -> int:
        """Transformer layers in every chunk (uniform split)."""
        return self.model.num_layers // (self.pp * self.num_chunks)

    def layer_offset(self, pp_rank: int, chunk: int) -> int:
        """Global index of local layer 0 of ``chunk`` on stage ``pp_rank``."""
        return chunk * (self.model.num_layers // self.num_chunks) + pp_rank * self.layers_per_chunk

    def is_first(self, pp_rank: int, chunk: int) -> bool:
        """Whether this chunk holds the word embeddings (megatron's ``pre_process``)."""
        return pp_rank == 0 and chunk == 0

    def is_last(self, pp_rank: int, chunk: int) -> bool:
        """Whether this chunk holds the final norm and head (megatron's ``post_process``)."""
        return pp_rank == self.pp - 1 and chunk == self.num_chunks - 1

    def has_output_weight(self, pp_rank: int, chunk: int, head: str) -> bool:
        """Whether this chunk holds an ``output_layer`` weight (tied: only a PP copy)."""
        if not self.is_last(pp_rank, chunk):
            return False
        tied = self.model.tie_word_embeddings and head == HEAD_LM
        return not (tied and self.is_first(pp_rank, chunk))

    def ranks(self) -> Iterator[tuple[int, int]]:
        """Every ``(pp_rank, tp_rank)`` of the layout, pipeline-major."""
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                yield pp_rank, tp_rank


def hf_shapes(model_cfg: ModelConfig, head: str = HEAD_LM) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF model with its expected shape, in HF order."""
    m = model_cfg
    H, d, F, V = m.hidden_size, m.head_dim, m.ffn_hidden_size, m.vocab_size
    shapes: dict[str, tuple[int, ...]] = {HF_EMBEDDING: (V, H)}
    per_layer: dict[str, tuple[int, ...]] = {
        "in_norm": (H,),
        "mlp_norm": (H,),
        "q": (m.num_attention_heads * d, H),
        "k": (m.query_groups * d, H),
        "v": (m.query_groups * d, H),
        "o": (H, m.num_attention_heads * d),
        "gate": (F, H),
        "up": (F, H),
        "down": (H, F),
        "q_bias": (m.num_attention_heads * d,),
        "k_bias": (m.query_groups * d,),
        "v_bias": (m.query_groups * d,),
        "q_norm": (d,),
        "k_norm": (d,),
    }
    for i in range(m.num_layers):
        for role, name in hf_layer_names(i, m).items():
            shapes[name] = per_layer[role]
    shapes[HF_FINAL_NORM] = (H,)
    if head == HEAD_SCORE:
        shapes[HF_SCORE] = (1, H)
    elif not m.tie_word_embeddings:
        shapes[HF_LM_HEAD] = (V, H)
    return shapes


def mcore_chunk_shapes(
    layout: Layout, pp_rank: int, chunk: int, head: str = HEAD_LM
) -> dict[str, tuple[int, ...]]:
    """Every tensor name of one megatron chunk (no ``_extra_state``) with its shape."""
    m, tp = layout.model, layout.tp
    H, d, F, V = m.hidden_size, m.head_dim, m.ffn_hidden_size, m.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    if layout.is_first(pp_rank, chunk):
        shapes[MCORE_EMBEDDING] = (V // tp, H)
    per_layer = {
        "in_norm": (H,),
        "qkv": ((m.num_attention_heads + 2 * m.query_groups) * d // tp, H),
        "proj": (H, m.num_attention_heads * d // tp),
        "mlp_norm": (H,),
        "fc1": (2 * F // tp, H),
        "fc2": (H, F // tp),
        "qkv_bias": ((m.num_attention_heads + 2 * m.query_groups) * d // tp,),
        "q_norm": (d,),
        "k_norm": (d,),
    }
    for i in range(layout.layers_per_chunk):
        for role, name in mcore_layer_names(i, m).items():
            shapes[name] = per_layer[role]
    if layout.is_last(pp_rank, chunk):
        shapes[MCORE_FINAL_NORM] = (H,)
        if head == HEAD_SCORE:
            shapes[MCORE_SCORE] = (1, H)  # a critic's head also has a bias (optional)
        elif layout.has_output_weight(pp_rank, chunk, head):
            shapes[MCORE_OUTPUT] = (V // tp, H)
    return shapes


def detect_head(hf_state: dict) -> str:
    """``"score"`` when the HF state has a ``score.weight`` (reward/critic), else ``"lm"``."""
    return HEAD_SCORE if HF_SCORE in hf_state else HEAD_LM


def detect_shards_head(shards: dict) -> str:
    """``"score"`` when the shards hold a ``ScalarHead`` output layer, else ``"lm"``."""
    for chunks in shards.values():
        for chunk in chunks:
            if MCORE_SCORE in chunk:
                return HEAD_SCORE
    return HEAD_LM


def check_hf_state(hf_state: dict, model_cfg: ModelConfig, head: str = HEAD_LM) -> None:
    """Raise ``ConversionError`` for missing, unexpected or misshapen HF tensors."""
    expected = hf_shapes(model_cfg, head)
    missing = [name for name in expected if name not in hf_state]
    if missing:
        raise ConversionError(f"HF state is missing tensor(s) {missing[:5]}")
    tolerated = {HF_LM_HEAD} if model_cfg.tie_word_embeddings else set()
    unexpected = [
        name
        for name in hf_state
        if name not in expected and name not in tolerated and not name.endswith("inv_freq")
    ]
    if unexpected:
        raise ConversionError(
            f"HF state has tensor(s) {unexpected[:5]} that a model with this config does not "
            f"have (num_layers={model_cfg.num_layers}, tie_word_embeddings="
            f"{model_cfg.tie_word_embeddings}, head={head!r})"
        )
    for name, shape in expected.items():
        if tuple(hf_state[name].shape) != shape:
            raise ConversionError(
                f"HF tensor {name!r} has shape {tuple(hf_state[name].shape)}, expected {shape}"
            )
    if HF_LM_HEAD in tolerated and HF_LM_HEAD in hf_state:
        if not torch.equal(hf_state[HF_LM_HEAD], hf_state[HF_EMBEDDING]):
            raise ConversionError(
                f"tie_word_embeddings=True but HF '{HF_LM_HEAD}' differs from '{HF_EMBEDDING}'"
            )


def check_shards(shards: dict, layout: Layout, head: str) -> None:
    """Raise ``ConversionError`` unless ``shards`` has every rank, chunk and tensor shape."""
    expected_ranks = set(layout.ranks())
    if set(shards) != expected_ranks:
        raise ConversionError(
            f"shards are for ranks {sorted(shards)}, expected (pp_rank, tp_rank) in "
            f"{sorted(expected_ranks)} for tp={layout.tp} pp={layout.pp}"
        )
    for (p, t), chunks in shards.items():
        if len(chunks) != layout.num_chunks:
            raise ConversionError(
                f"rank (pp={p}, tp={t}) has {len(chunks)} chunk(s), expected {layout.num_chunks}"
            )
        for c, chunk in enumerate(chunks):
            where = f"rank (pp={p}, tp={t}) chunk {c}"
            expected = mcore_chunk_shapes(layout, p, c, head)
            names = {n for n in chunk if not n.endswith(EXTRA_STATE)}
            optional = {MCORE_SCORE_BIAS}
            if MCORE_SCORE in expected:  # a critic's value head carries a bias
                expected[MCORE_SCORE_BIAS] = (1,)
            missing = sorted(set(expected) - names - optional)
            if missing:
                raise ConversionError(f"{where} is missing tensor(s) {missing[:5]}")
            unexpected = sorted(names - set(expected) - optional)
            if unexpected:
                raise ConversionError(f"{where} has unexpected tensor(s) {unexpected[:5]}")
            for name in names:
                if tuple(chunk[name].shape) != expected[name]:
                    raise ConversionError(
                        f"{where}: tensor {name!r} has shape {tuple(chunk[name].shape)}, "
                        f"expected {expected[name]}"
                    )
