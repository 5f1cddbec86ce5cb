"""What a Hugging Face architecture is, for moekit: the `Family` base class and the config helpers families share.

A family module (``moekit/families/mixtral.py`` ...) subclasses `Family` and declares, in one place:

- `model_type`, `architecture` (the transformers class `AutoModelForCausalLM` builds) and `defaults` (the
  transformers config class's values for keys a ``config.json`` may leave out);
- the config mapping both ways: `read_config` (a ``config.json`` dict -> the `ModelConfig` computing the same
  function, refusing anything moekit cannot compute exactly) and `write_config` (a `ModelConfig` the family can
  express -> ``config.json`` fields), with `problems` saying why a `ModelConfig` cannot be expressed;
- which layers are MoE (inside `read_config` / `write_config`: each family's own keys);
- the tensor map as data: the MoE block's tensor names (`block_names`, moekit name -> transformers name, both
  relative to the block), value transforms where layouts differ (`block_transforms`), where the block sits in a
  decoder layer (`hf_block`) and how per-expert checkpoints store experts (`expert_files`); every other tensor is
  ``model.`` + moekit's name, since moekit's model uses transformers' names;
- the transformers MoE block classes it reads (`block_classes`) and how a block instance's routing settings map
  to a `MoEConfig` (`block_config`), for `MoELayer.from_hf`.

Beside this module: `config_io` (a config.json read with a family's defaults and aliases, the readers and writers
families share), `problems` (what a family cannot hold, in words), `equivalence` (when two configs compute the same
function), `moe_common` (behaviour several MoE families share: softmax routing's export, block reading helpers) and
`tensor_map`, which runs the tensor map in both directions. `moekit.interop` (load, export, merge, upcycle),
`moekit.info` and `MoELayer.from_hf` use families only through this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..config import ModelConfig, MoEConfig
from .equivalence import canonical

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(frozen=True)
class Transform:
    """The same values in moekit's layout and in the family's: `to_moekit` and `to_hf` undo each other."""

    to_moekit: Callable[[Tensor], Tensor]
    to_hf: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExpertFiles:
    """How a per-expert checkpoint stores one layer's experts (what transformers' conversion mapping fuses).

    Expert e's projections are ``model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight``; fused in memory they
    are ``experts.gate_up_proj`` (gate rows, then up rows) and ``experts.down_proj``.
    """

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


class StateSource(Protocol):
    """moekit tensors by name, read on demand (a model's state dict, or a merge's inputs)."""

    def get(self, name: str) -> Tensor: ...

    def get_expert(self, name: str, expert: int) -> Tensor: ...


class DictSource:
    """A `StateSource` over a state dict."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    def get(self, name: str) -> Tensor:
        return self.state[name]

    def get_expert(self, name: str, expert: int) -> Tensor:
        return self.state[name][expert]


class MappedSource:
    """`source` with some tensors changed (`change`: name -> function of the tensor, applied to expert slices too, so
    only slice-wise functions such as scaling belong there) and some added (`add`: name -> function making it)."""

    def __init__(self, source: StateSource, change: dict[str, Callable[[Tensor], Tensor]] | None = None,
                 add: dict[str, Callable[[], Tensor]] | None = None) -> None:
        self.source, self.change, self.add = source, change or {}, add or {}

    def get(self, name: str) -> Tensor:
        if name in self.add:
            return self.add[name]()
        tensor = self.source.get(name)
        return self.change[name](tensor) if name in self.change else tensor

    def get_expert(self, name: str, expert: int) -> Tensor:
        if name in self.add:
            return self.add[name]()[expert]
        tensor = self.source.get_expert(name, expert)
        return self.change[name](tensor) if name in self.change else tensor


class Family:
    """One Hugging Face architecture (see the module docstring). Subclasses set the class attributes."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    is_moe: ClassVar[bool] = True
    #: values of the transformers config class for keys a config.json may omit (checked against transformers in tests)
    defaults: ClassVar[dict[str, Any]] = {}
    #: other spellings of a config key (transformers' `attribute_map`: alias -> the attribute it stands for)
    aliases: ClassVar[dict[str, str]] = {}
    #: the attribute of a decoder layer holding the FFN (dense or MoE) in transformers' module tree
    hf_block: ClassVar[str] = "mlp"
    #: MoE block tensors: moekit name -> transformers name, both relative to the block
    block_names: ClassVar[dict[str, str]] = {}
    #: moekit block name -> how its values differ from the transformers tensor's
    block_transforms: ClassVar[dict[str, Transform]] = {}
    #: per-expert checkpoint layout, or None when checkpoints store the fused tensors (GPT-OSS)
    expert_files: ClassVar[ExpertFiles | None] = ExpertFiles()
    #: the transformers MoE block classes this family reads, as "module.ClassName"
    block_classes: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ config
    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:  # pragma: no cover - abstract
        """The `ModelConfig` computing what transformers computes for this ``config.json`` dict.

        Raises:
            ValueError: a setting moekit cannot compute exactly, naming it and what is supported.
        """
        raise NotImplementedError

    def write_config(self, config: ModelConfig) -> dict[str, Any]:  # pragma: no cover - abstract
        """The ``config.json`` fields (without dtype, token ids and metadata) of `config`; call `problems` first."""
        raise NotImplementedError

    def problems(self, config: ModelConfig) -> list[str]:
        """Why this family cannot express `config` exactly (empty when it can)."""
        return []

    # ------------------------------------------------------------------ export and its inverse
    def export_config(self, config: ModelConfig) -> ModelConfig:
        """The config this family writes for `config`: one it expresses natively that computes the same function
        (from the tensors `export_source` gives). Call `problems` first."""
        return canonical(config)

    def export_source(self, config: ModelConfig, source: StateSource) -> StateSource:
        """`config`'s tensors as `export_config(config)`'s model holds them.

        Raises:
            ValueError: a tensor value the family cannot hold (a nonzero selection bias where it has none...).
        """
        return source

    def restore(self, stored: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Undo `export_source`: the state of `export_config(stored)`'s model -> `stored`'s model's state.

        Raises:
            ValueError: the state is not what an export of `stored` writes (so `stored` does not describe it).
        """
        return state

    # ------------------------------------------------------------------ tensors that need more than a renaming
    def extra_tensors(self, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]]:
        """Tensors the family's checkpoint must hold that moekit's model has no place for (zero-width parts)."""
        return {}

    def ignorable_tensors(self, config: ModelConfig) -> dict[str, bool]:
        """Checkpoint tensors moekit may drop for this config: name -> True if they must be all zeros to be dropped
        (they would change the output otherwise), False if they never change it (they multiply a width-0 part)."""
        return {}

    def ignorable_block_tensors(self, moe: MoEConfig) -> dict[str, bool]:
        """`ignorable_tensors` for one transformers MoE block (names relative to the block)."""
        return {}

    # ------------------------------------------------------------------ transformers blocks
    def block_config(self, block: nn.Module) -> MoEConfig:  # pragma: no cover - abstract
        """The `MoEConfig` of a transformers MoE block instance of one of `block_classes` (its routing settings)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.model_type}>"


