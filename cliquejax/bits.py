"""How many bits each weight is stored in, as recorded by the layer that quantizes it.

A layer that binarises a weight declares it with `layers.quantized_param`, which returns
the weight as the forward pass uses it and records, in the `bits` collection at the
parameter's own path, the bits it is stored in (1 when binarised, else 32). `summary` and
`export` read that record from `jax.eval_shape(model.init, ...)`: the count follows the
layers, so a new binary layer cannot be left out of it. A record holds its number as static
pytree data (no array leaf), so it survives `jax.eval_shape` and adds nothing to a
parameter tree, a training state or a checkpoint.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from cliquejax import names

FLOAT_BITS = 32


@flax.struct.dataclass
class Stored:
    """The storage of one parameter: `bits` per weight."""

    bits: int = flax.struct.field(pytree_node=False)


def record(module, name: str, bits: int) -> None:
    """Records that `module`'s parameter `name` is stored in `bits` bits per weight (while the
    `bits` collection is mutable: at `init`)."""
    if module.is_mutable_collection(names.BITS):
        module.put_variable(names.BITS, name, Stored(bits))


def abstract_variables(model, image_shape) -> dict:
    """`model.init` for one image of `image_shape`, as shapes (nothing allocated)."""
    image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), image)


def weight_bits(variables) -> dict:
    """A pytree like `variables["params"]`: the recorded bits per weight of each parameter,
    `FLOAT_BITS` where no layer recorded any."""
    recorded = variables.get(names.BITS, {})

    def lookup(path, _):
        node = recorded
        for key in names.path_string(path).split("/"):
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node.bits if isinstance(node, Stored) else FLOAT_BITS

    return jax.tree_util.tree_map_with_path(lookup, variables[names.PARAMS])


def binary_mask(variables) -> dict:
    """A pytree of bools like `variables["params"]`: which parameters are stored as 1-bit
    signs."""
    return jax.tree.map(lambda b: b == 1, weight_bits(variables))


def has_quantized_layers(variables) -> bool:
    """Whether any layer of the model recorded its storage (a model with binary layers,
    binarised or not, e.g. u-MBCliqueNet)."""
    return bool(variables.get(names.BITS))
